"""A second, larger held-out set for paired comparisons: N fresh `wallet` problems that no run's
teacher stream drew and no run's D_A–D_D holds, then every model of each run on them (greedy,
the run's own evaluation settings), one outcome per problem.

Why wallet only: it is the kind on which the models differ (the teacher's ±10 carry slips; the
other kinds are near 100%), and the only one with room for a fresh set. The teacher's stream
(data seed 1, 70,400 problems) covers most of `shop`, `share` and `trip`, while `wallet` has
~850,000 distinct questions of which it draws ~2%.

    python research/scripts/fresh_wallet_eval.py [--models=a,b] [--problems=FILE]
        OUT_DIR N RUN_DIR [RUN_DIR ...]

Writes `OUT_DIR/problems.jsonl` (the set) and `OUT_DIR/<run>.json` ({model: "1"/"0" string,
in problem order}), adding the models a file lacks, so it can be rerun as runs gain methods.
The set is drawn once, excluding the D_A–D_D of the runs passed that first time; to put new
runs on the existing set in a new folder, pass `--problems=research/fresh_wallet/problems.jsonl`
(the one committed copy; every `fresh_wallet*` folder uses it). A fresh draw with other runs
excluded is a different set.
Then `summarise_fresh.py` pairs them.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from padd.config import config_from_dict
from padd.data.jsonl import load_jsonl
from padd.data.synthetic import KINDS, generate_problems, iter_problems
from padd.pipeline.evaluate import evaluate_model
from padd.pipeline.inputs import RunInputs
from padd.pipeline.run_dir import RunDir

SEED = 20261128  # the fresh set's own stream
EVAL_BATCH = 500  # the same for every model; larger than the runs' 100 for speed on the CPU
TEACHER_STREAM_SEED, TEACHER_STREAM_RAW = 1, 100_000  # > 1100 steps x 64 + the run's exclusions


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    only = args.pop(0).split("=", 1)[1].split(",") if args[0].startswith("--models=") else None
    shared = Path(args.pop(0).split("=", 1)[1]) if args[0].startswith("--problems=") else None
    out_dir, n, roots = Path(args[0]), int(args[1]), [Path(a) for a in args[2:]]
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    problems_file = shared or out_dir / "problems.jsonl"
    if not problems_file.exists():
        stream = iter_problems(TEACHER_STREAM_SEED, KINDS)
        exclude = {next(stream).question for _ in range(TEACHER_STREAM_RAW)}
        for root in roots:
            for split in "ABCD":
                for line in (root / "data" / f"D_{split}.jsonl").read_text().splitlines():
                    exclude.add(json.loads(line)["question"])
        drawn = generate_problems(n, seed=SEED, kinds=["wallet"], exclude=exclude)
        fresh = [{"question": p.question, "answer": p.solution, "kind": p.kind} for p in drawn]
        problems_file.write_text("".join(json.dumps(p) + "\n" for p in fresh))
        print(f"{n} fresh wallet problems; {len(exclude)} questions excluded", flush=True)

    # Model-major: the models asked first (in `--models` order) get every run before the next one.
    runs = {}
    for root in roots:
        cfg = config_from_dict(yaml.safe_load((root / "config.yaml").read_text()))
        cfg.eval.batch_size = EVAL_BATCH
        run = RunDir(root)
        models = {
            "teacher": (None, False),
            "base_student": (run.stage1_student, True),
            "padd": (root / "train" / "final", True),
        }
        for path in run.compare_results():
            name = path.parent.name
            if (path.parent / "final").is_dir():
                models[name] = (path.parent / "final", name not in ("teacher_grpo", "teacher_sft"))
        runs[root] = (cfg, RunInputs.read_only(cfg), models)
    problems = load_jsonl(problems_file, kind_field="kind")
    names = only or list(dict.fromkeys(n for _, _, models in runs.values() for n in models))
    for name in names:
        for root, (cfg, inputs, models) in runs.items():
            result_file = out_dir / f"{root.name}.json"
            results = json.loads(result_file.read_text()) if result_file.exists() else {}
            if name in results or name not in models:
                continue
            model_dir, moe = models[name]
            with tempfile.TemporaryDirectory() as tmp:
                res = evaluate_model(
                    model_dir,
                    name,
                    Path(tmp),
                    moe=moe,
                    cfg=cfg,
                    tokenizer=inputs.tokenizer,
                    problems=problems,
                    load_teacher=inputs.load_teacher,
                )
            results[name] = res["correct"]
            result_file.write_text(json.dumps(results, indent=1))
            print(root.name, name, f"{res['accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    main()
