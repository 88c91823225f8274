"""The PADD step on padd's experts against transformers' default experts, and against the
MoE-vanilla-GRPO step, in the same run, on the same models.

    python benchmarks/bench_padd_step.py [--steps 6] [--prompts 8] [--generations 8] [--new-tokens 48]
    python -m pytest benchmarks/bench_padd_step.py -s      (PADD_BENCH_OUT=dir writes JSON)

Three `PADDTrainer`s run on copies of one student, interleaved step by step so a change in
machine load hits all alike:
- `padd`: preset `padd`, experts on `experts_implementation="padd"` (what `padd train` runs);
- `padd@<default>`: the same on transformers' default experts implementation (`grouped_mm`
  where it can dispatch), the peer for padd's kernels (on CPU: padd's PyTorch reference);
- `vanilla_grpo`: preset `vanilla_grpo` on padd's experts, the peer for PADD's overhead. The student is the
project's embedded default shape (4 layers, hidden 128, FFN 512 → 8 experts of 256, top-2,
character vocabulary); the teacher is the dense Llama it would be decompressed from. EOS is
suppressed in sampling so both methods generate the same number of tokens.

Reported: median step time of each, PADD's overhead in % (target ≤ +15%; the paper reports
+20–32%) as the ratio of medians, as the median of interleaved per-step ratios, and as the
added work alone (teacher scoring + the update's difference; generation is identical work), and
the split into generation, teacher scoring and update. On CPU these are CPU
figures (labelled so), not GPU results.

    python benchmarks/bench_padd_step.py --small [--steps 3] [--eval-reps 2] [--threads 0]

`--small` instead times padd's decode loop (`padd.training.decode`) against the path it replaced
(transformers' `generate`), both in this run: the `small` preset's Stages II–IV step (its student
decompressed from a random-weight teacher of the preset's shape, Stage I warmup skipped; cached in
`--workdir`) on two trainers, one per path, from the same weights and seed, interleaved step by
step (alternating which goes first), each with its own RNG stream; and the greedy evaluation of
D_D's 500 problems (batches of 100) of the Stage-I student (with routing statistics) and of the
teacher. It prints per-part seconds, the ratios old/new and whether both paths gave identical
metrics and completions (they should: the decode is token-identical). A random teacher solves
nothing, so `kd_on=teacher_correct` would switch KD off: here its greedy check still runs (and is
timed) but every row is distilled, as with the trained teacher (~96% correct).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import Record, device_info, write_results  # noqa: E402
from padd.data.problem import Problem  # noqa: E402
from padd.moe.hf_experts import use_experts  # noqa: E402
from padd.training.config import preset  # noqa: E402
from padd.training.trainer import PADDTrainer  # noqa: E402

SUITE = "padd_step"
SMALL_SPLIT = ("time_generation", "time_teacher", "time_update", "time_step")
SPLIT = ("time_generation", "time_reward", "time_teacher", "time_update", "time_step")


def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in sorted(set("0123456789 +-*/=#.?:QA\n$abcdefghijklmnopqrstuvwxyz")):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _models(vocab_size: int, device: torch.device):
    common = dict(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
        bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=512)).to(device).eval()
    student = MixtralForCausalLM(
        MixtralConfig(**common, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2)
    ).to(device)
    student.generation_config.suppress_tokens = [1]  # fixed-length rollouts for both methods
    return teacher, student.eval()


def _problems(n: int) -> list[Problem]:
    return [Problem(f"{a}+{2 * a + 1}?", "", str(3 * a + 1), "add") for a in range(11, 11 + n)]


def _on(student, implementation: str):
    return use_experts(copy.deepcopy(student), implementation)


def run(steps: int = 6, prompts: int = 8, generations: int = 8, new_tokens: int = 48) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = _tokenizer()
    teacher, student = _models(len(tok), device)
    default = student.config._experts_implementation  # transformers' choice on this device
    problems = _problems(prompts)
    common = dict(num_generations=generations, max_new_tokens=new_tokens, learning_rate=1e-4, seed=0)
    trainers = {
        "vanilla_grpo": PADDTrainer(_on(student, "padd"), None, tok, preset("vanilla_grpo", **common)),
        "padd": PADDTrainer(_on(student, "padd"), teacher, tok, preset("padd", **common)),
        f"padd@{default}": PADDTrainer(_on(student, default), teacher, tok, preset("padd", **common)),
    }
    times: dict[str, dict[str, list[float]]] = {name: {k: [] for k in SPLIT} for name in trainers}
    for step in range(steps + 1):  # step 0 warms up (allocations, first-call overheads)
        for name, trainer in trainers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            m = trainer.step(problems)
            if step > 0:
                for k in SPLIT:
                    times[name][k].append(m.get(k, 0.0))
    med = {name: {k: statistics.median(v) for k, v in split.items()} for name, split in times.items()}
    base, padd = med["vanilla_grpo"]["time_step"], med["padd"]["time_step"]
    # Steps are interleaved in pairs, so the per-pair ratio cancels slow drifts in machine load.
    pairs = zip(times["padd"]["time_step"], times["vanilla_grpo"]["time_step"], strict=True)
    # The work PADD adds: teacher scoring, and KD/drift/bias inside the update. Generation is the
    # same work for both (same shapes, same token count), so its difference is measurement noise.
    added = med["padd"]["time_teacher"] + med["padd"]["time_update"] - med["vanilla_grpo"]["time_update"]
    peer = med[f"padd@{default}"]["time_step"]
    kernel_pairs = zip(times["padd"]["time_step"], times[f"padd@{default}"]["time_step"], strict=True)
    return {
        "median_s": med,
        "default_experts": default,
        "padd_vs_default_ratio": padd / peer,
        "padd_vs_default_paired_ratio": statistics.median(p / d for p, d in kernel_pairs),
        "overhead_pct": 100.0 * (padd - base) / base,
        "paired_overhead_pct": 100.0 * (statistics.median(p / v for p, v in pairs) - 1.0),
        "added_work_pct": 100.0 * added / base,
        "shape": dict(prompts=prompts, generations=generations, new_tokens=new_tokens, steps=steps),
        "threads": torch.get_num_threads(),
    }


def report(result: dict) -> list[Record]:
    kind = device_info()["kind"].upper()
    med = result["median_s"]
    print(f"[{kind}] PADD step vs MoE-vanilla-GRPO step, {result['shape']}, {result['threads']} threads")
    print(f"{'trainer':<20}" + "".join(f"{k[5:]:>12}" for k in SPLIT) + "   (median seconds)")
    for name, split in med.items():
        print(f"{name:<20}" + "".join(f"{split[k]:12.4f}" for k in SPLIT))
    diff = {k: med["padd"][k] - med["vanilla_grpo"][k] for k in SPLIT}
    print(f"{'padd - vanilla':<20}" + "".join(f"{diff[k]:12.4f}" for k in SPLIT))
    print(
        f"[{kind}] PADD step on padd's experts / on transformers' {result['default_experts']!r}: "
        f"{result['padd_vs_default_ratio']:.3f} (ratio of medians), "
        f"{result['padd_vs_default_paired_ratio']:.3f} (median of interleaved pairs); <= 1: as fast"
    )
    print(
        f"[{kind}] PADD overhead over MoE-vanilla-GRPO: {result['overhead_pct']:+.1f}% (ratio of medians), "
        f"{result['paired_overhead_pct']:+.1f}% (median of interleaved pairs), "
        f"{result['added_work_pct']:+.1f}% (teacher + update difference only); target <= +15%"
    )
    return [
        Record(
            SUITE,
            "train_step",
            name,
            result["shape"],
            1e3 * split["time_step"],
            float("nan"),
            float("nan"),
            extra={
                "split_s": split,
                "overhead_pct": result["overhead_pct"],
                "padd_vs_default_ratio": result["padd_vs_default_ratio"],
                "padd_vs_default_paired_ratio": result["padd_vs_default_paired_ratio"],
                "default_experts": result["default_experts"],
            },
        )  # fmt: skip
        for name, split in med.items()
    ]


@contextlib.contextmanager
def old_decode():
    """Rollouts and evaluation on transformers' `generate`, as before `padd.training.decode`."""
    from padd.training import decode

    supported = decode.supported
    decode.supported = lambda *args, **kwargs: False
    try:
        yield
    finally:
        decode.supported = supported


def _small_models(workdir: Path):
    """The `small` preset's config, inputs, tokenizer, teacher (random weights, cached) and the
    directory of its decompressed Stage-I student (no warmup; cached)."""
    from padd.config import load_config
    from padd.moe.hf_experts import use_experts
    from padd.pipeline.inputs import RunInputs, load_model
    from padd.pipeline.run_dir import RunDir
    from padd.pipeline.stage1 import build_student
    from padd.pipeline.teacher import build_tiny_llama
    from padd.training.checkpointing import GracefulInterrupt

    cfg = load_config("small")
    inputs = RunInputs(cfg, RunDir(workdir / "run"), device=torch.device("cpu"), save_tokenizer=False)
    tok = inputs.tokenizer
    student_dir, teacher_dir = workdir / "student", workdir / "teacher"
    if not (student_dir / "config.json").is_file() or not (teacher_dir / "config.json").is_file():
        t = cfg.teacher
        torch.manual_seed(0)
        teacher = build_tiny_llama(
            len(tok), t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size, t.max_position,
            tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
        )  # fmt: skip
        teacher = use_experts(teacher, cfg.run.experts_implementation).eval()
        build_student(
            cfg, teacher, tok, inputs.split("A"), inputs.split("B"), student_dir, GracefulInterrupt(),
            lambda record: None, warmup_experts=False,
        )  # fmt: skip
        teacher.save_pretrained(teacher_dir)
    teacher = load_model(teacher_dir, cfg.teacher.dtype, cfg.run.experts_implementation)
    return cfg, inputs, tok, teacher, student_dir


def _small_trainer(cfg, tok, teacher, student_dir: Path) -> PADDTrainer:
    from padd.decompress.sequence_targets import SequenceRouterTargets
    from padd.moe.router_groups import TiedRouterGroups
    from padd.moe.routing_control import RoutingControl
    from padd.pipeline.inputs import load_model
    from padd.pipeline.methods import run_router_weight, training_config

    student = load_model(student_dir, cfg.teacher.dtype, cfg.run.experts_implementation)
    control = RoutingControl(student)
    control.load_selection_bias(student_dir)
    targets = SequenceRouterTargets.load(student_dir)
    targets = targets.with_xi(cfg.router.xi) if targets is not None else None
    TiedRouterGroups(student)  # as padd train does (its hooks stay for the trainer's life)
    weight = run_router_weight(cfg) if targets is not None else 0.0
    pcfg = training_config(cfg.training.method, cfg.training.params, cfg.run.seed, weight)
    trainer = PADDTrainer(student, teacher, tok, pcfg, control, router_targets=targets)
    solves = trainer._teacher_solves
    trainer._teacher_solves = lambda problems: solves(problems) | True  # see the module doc
    return trainer


def run_small(workdir: Path, steps: int = 3, eval_reps: int = 2) -> dict:
    """The `--small` comparison (module doc): old path / padd decode, per part, same run."""
    from padd.moe.routing_control import RoutingControl
    from padd.training.evaluation import evaluate_batches
    from padd.training.prompts import prompt_batches

    cfg, inputs, tok, teacher, student_dir = _small_models(workdir)
    paths = {"old": old_decode, "new": contextlib.nullcontext}
    trainers = {name: _small_trainer(cfg, tok, teacher, student_dir) for name in paths}
    rng = {name: torch.get_rng_state() for name in paths}  # one stream per trainer, same seed
    per_step = cfg.training.prompts_per_step * cfg.training.params.dynamic_sampling
    batches = prompt_batches(inputs.split("C"), per_step, cfg.run.seed)
    times: dict[str, dict[str, list[float]]] = {name: {k: [] for k in SMALL_SPLIT} for name in paths}
    same_metrics = True
    for step in range(steps + 1):  # step 0 warms up
        problems = next(batches)
        order = list(paths) if step % 2 == 0 else list(paths)[::-1]
        metrics = {}
        for name in order:
            torch.set_rng_state(rng[name])
            with paths[name]():
                metrics[name] = trainers[name].step(problems)
            rng[name] = torch.get_rng_state()
            if step > 0:
                for k in SMALL_SPLIT:
                    times[name][k].append(metrics[name][k])
            split = " ".join(f"{k[5:]} {metrics[name][k]:.3f}" for k in SMALL_SPLIT)
            print(f"step {step}{' (warmup)' if step == 0 else ''} {name}: {split}", flush=True)
        same_metrics &= _without_times(metrics["old"]) == _without_times(metrics["new"])
    out = {
        "step_median_s": {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()},
        "step_paired_ratio": {
            k: statistics.median(o / n for o, n in zip(times["old"][k], times["new"][k], strict=True))
            for k in SMALL_SPLIT
        },
        "step_metrics_identical": same_metrics,
    }
    # Evaluation: D_D (500 problems) in the preset's batches, greedy, the student with routing stats.
    student = trainers["new"].student
    student.eval()
    evals: dict[str, dict[str, list[float]]] = {
        "student": {"old": [], "new": []},
        "teacher": {"old": [], "new": []},
    }
    same_eval = True
    d_d = inputs.eval_problems()
    for rep in range(eval_reps):
        for model_name, model in (("student", student), ("teacher", teacher)):
            order = list(paths) if rep % 2 == 0 else list(paths)[::-1]
            outcomes = {}
            for name in order:
                control = RoutingControl(model) if model_name == "student" else None
                t0 = time.perf_counter()
                with paths[name]():
                    res = evaluate_batches(
                        model, tok, d_d, max_new_tokens=cfg.eval.max_new_tokens,
                        batch_size=cfg.eval.batch_size, control=control,
                    )  # fmt: skip
                evals[model_name][name].append(time.perf_counter() - t0)
                print(f"eval {model_name} {name}: {evals[model_name][name][-1]:.3f} s", flush=True)
                if control is not None:
                    control.remove()
                outcomes[name] = [(o.completions, o.correct, o.experts_by_layer) for o in res]
            same_eval &= outcomes["old"] == outcomes["new"]
    out.update(
        eval_median_s={m: {name: statistics.median(v) for name, v in t.items()} for m, t in evals.items()},
        eval_paired_ratio={
            m: statistics.median(o / n for o, n in zip(t["old"], t["new"], strict=True))
            for m, t in evals.items()
        },
        eval_outputs_identical=same_eval,
        eval_problems=len(d_d),
        shape=dict(steps=steps, eval_reps=eval_reps),
        threads=torch.get_num_threads(),
    )
    return out


def _without_times(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("time_")}


def report_small(result: dict) -> None:
    kind = device_info()["kind"].upper()
    med, ratio = result["step_median_s"], result["step_paired_ratio"]
    print(f"[{kind}] small preset, Stages II-IV step: transformers generate (old) vs padd decode (new), "
          f"{result['shape']}, {result['threads']} threads")  # fmt: skip
    print(f"{'path':<8}" + "".join(f"{k[5:]:>12}" for k in SMALL_SPLIT) + "   (median seconds)")
    for name, split in med.items():
        print(f"{name:<8}" + "".join(f"{split[k]:12.3f}" for k in SMALL_SPLIT))
    print(
        f"{'old/new':<8}" + "".join(f"{ratio[k]:12.2f}" for k in SMALL_SPLIT) + "   (median of paired ratios)"
    )
    print(f"[{kind}] step metrics identical on both paths: {result['step_metrics_identical']}")
    print(f"[{kind}] evaluation of {result['eval_problems']} problems (seconds, median):")
    for model, split in result["eval_median_s"].items():
        print(f"  {model:<8} old {split['old']:8.3f}   new {split['new']:8.3f}   "
              f"old/new {result['eval_paired_ratio'][model]:.2f}")  # fmt: skip
    print(f"[{kind}] evaluation outputs identical on both paths: {result['eval_outputs_identical']}")


def test_bench_padd_step():
    previous = torch.get_num_threads()
    if not torch.cuda.is_available():  # a shared CPU: oversubscribed threads make timings noise
        torch.set_num_threads(1)
    try:
        records = report(run(steps=4))
    finally:
        torch.set_num_threads(previous)
    write_results(SUITE, records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    parser.add_argument("--json", action="store_true", help="write the results JSON")
    parser.add_argument("--small", action="store_true", help="padd decode vs generate on the small preset")
    parser.add_argument("--eval-reps", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "padd-bench-small")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.small:
        result = run_small(args.workdir, args.steps if args.steps != 6 else 3, args.eval_reps)
        report_small(result)
        if args.json:
            print(json.dumps(result, indent=1))
        return
    records = report(run(args.steps, args.prompts, args.generations, args.new_tokens))
    if args.json:
        print(write_results(SUITE, records))


if __name__ == "__main__":
    main()
