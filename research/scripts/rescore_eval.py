"""Add per-problem outcomes (`correct`) to a finished run's eval files written before they
existed: re-run the same greedy evaluation of each model, check that its accuracy equals the
recorded one, and write only the `correct` string into the file.

    python research/scripts/rescore_eval.py RUN_DIR [THREADS] [METHOD,METHOD...]
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from padd.config import config_from_dict
from padd.pipeline.evaluate import evaluate_model
from padd.pipeline.inputs import RunInputs
from padd.pipeline.run_dir import RunDir


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0])
    torch.set_num_threads(int(argv[1]) if len(argv) > 1 else 1)
    only = set(argv[2].split(",")) if len(argv) > 2 else None
    cfg = config_from_dict(yaml.safe_load((root / "config.yaml").read_text()))
    run, inputs = RunDir(root), RunInputs.read_only(cfg)
    models = {
        "teacher": (run.eval / "teacher.json", None, False),
        "base_student": (run.eval / "base_student.json", run.stage1_student, True),
        "padd": (run.eval / "padd.json", root / "train" / "final", True),
    }
    for path in run.compare_results():
        name = path.parent.name
        models[name] = (path, path.parent / "final", name not in ("teacher_grpo", "teacher_sft"))
    for name, (path, model_dir, moe) in models.items():
        if (only and name not in only) or not path.exists():
            continue
        record = json.loads(path.read_text())
        if "correct" in record:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            res = evaluate_model(
                model_dir,
                name,
                Path(tmp),
                moe=moe,
                cfg=cfg,
                tokenizer=inputs.tokenizer,
                problems=inputs.eval_problems(),
                load_teacher=inputs.load_teacher,
            )
        if abs(res["accuracy"] - record["accuracy"]) > 1e-9:
            raise SystemExit(
                f"{root.name}/{name}: accuracy {res['accuracy']} != recorded {record['accuracy']}"
            )
        record["correct"] = res["correct"]
        path.write_text(json.dumps(record, indent=2))
        print(root.name, name, record["accuracy"], flush=True)


if __name__ == "__main__":
    main()
