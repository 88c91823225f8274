"""The `padd` command (also `python -m padd`).

    padd train CONFIG [--compare] [--force] [key.sub=value ...]
    padd eval CONFIG [--model DIR] [key.sub=value ...]
    padd convert CONFIG --out DIR [key.sub=value ...]
    padd flops TEACHER_DIR [STUDENT_DIR] [--seq-len N]
    padd report RUN_DIR

CONFIG is a preset name (`tiny`, `micro`, ...) or a path to a YAML file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config_args(p: argparse.ArgumentParser) -> None:
    from padd.config import preset_names

    p.add_argument("config", help=f"preset name ({', '.join(preset_names())}) or path to a YAML file")
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. training.steps=50"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="padd", description="Path-Aligned Decompression Distillation: dense teacher → MoE student."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run the full pipeline (resumable)", description="Run the full PADD "
                       "pipeline: teacher, data splits, Stage I, Stages II–IV, evaluation, report. "
                       "Steps already done in the run directory are skipped.")  # fmt: skip
    _config_args(p)
    p.add_argument("--compare", action="store_true", help="also run the baselines/ablations into one table")
    p.add_argument("--force", action="store_true", help="restart a run directory made by a different config")

    p = sub.add_parser("eval", help="held-out accuracy of a model", description="Greedy pass@1 of a model "
                       "on the run's held-out split D_D (default: the run's trained student).")  # fmt: skip
    _config_args(p)
    p.add_argument("--model", help="model directory (default: RUN_DIR/train/final)")

    p = sub.add_parser("convert", help="decompress the teacher into an MoE student (Stage I without warmup)",
                       description="Teacher statistics on D_A, clustering and student construction; "
                       "writes a transformers MoE model.")  # fmt: skip
    _config_args(p)
    p.add_argument("--out", required=True, help="output directory for the student")

    p = sub.add_parser("flops", help="FLOPs per token and parameters of models",
                       description="Analytic FLOPs per token and total/active parameters.")  # fmt: skip
    p.add_argument("teacher", help="model directory")
    p.add_argument("student", nargs="?", help="second model directory (e.g. the MoE student)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length for attention FLOPs")

    p = sub.add_parser("report", help="(re)build report.md/report.json/plots of a run",
                       description="Build the report of a run directory from its files.")  # fmt: skip
    p.add_argument("run_dir", help="run directory")
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from padd.config import load_config
    from padd.pipeline.run import run_train

    cfg = load_config(args.config, args.overrides)
    out = run_train(cfg, force=args.force, compare=args.compare)
    if (out / "report.md").exists():
        print(f"[padd] report: {out / 'report.md'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from padd.config import load_config
    from padd.pipeline.evaluate import evaluate_model
    from padd.pipeline.run import Pipeline

    cfg = load_config(args.config, args.overrides)
    pipe = Pipeline(cfg)
    model = Path(args.model) if args.model else pipe.dir / "train" / "final"
    if not (model / "config.json").exists():
        raise FileNotFoundError(f"no model at {model}")
    moe = (model / "padd_router_bias.safetensors").exists()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        res = evaluate_model(pipe, model, "eval", Path(tmp), moe=moe)
    res.pop("samples", None)
    print(json.dumps(res, indent=2))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from padd.config import load_config
    from padd.pipeline.checkpoint import GracefulInterrupt
    from padd.pipeline.run import Pipeline
    from padd.pipeline.stage1 import build_student

    cfg = load_config(args.config, args.overrides)
    pipe = Pipeline(cfg)
    pipe.run(until="teacher")
    with GracefulInterrupt() as interrupt:
        info = build_student(
            cfg, pipe.load_teacher(), pipe.tokenizer, pipe.split("A"), pipe.split("B"),
            Path(args.out), interrupt, pipe.metrics.log, warmup_experts=False,
        )  # fmt: skip
    print(json.dumps(info, indent=2))
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    from padd import flops
    from padd.pipeline.inputs import load_model

    teacher = load_model(args.teacher)
    if args.student:
        res = flops.compare(teacher, load_model(args.student), seq_len=args.seq_len, measured=False)
    else:
        res = {
            "analytic": flops.analytic(teacher.config, seq_len=args.seq_len).as_dict(),
            "params": flops.parameters(teacher),
            "active_params": flops.active_parameters(teacher),
        }
    print(json.dumps(res, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from padd.pipeline.report import write_report

    write_report(args.run_dir)
    print(f"[padd] report: {Path(args.run_dir) / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for config errors, 128+signal when interrupted)."""
    parser = build_parser()
    # Overrides may follow the flags (`padd train tiny --force a.b=1`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from transformers.utils import logging as hf_logging

    from padd.config import ConfigError
    from padd.pipeline.checkpoint import Interrupted

    hf_logging.disable_progress_bar()  # per-file load/save bars; ours are tqdm on long work
    commands = {
        "train": _cmd_train,
        "eval": _cmd_eval,
        "convert": _cmd_convert,
        "flops": _cmd_flops,
        "report": _cmd_report,
    }
    try:
        return commands[args.command](args)
    except ConfigError as e:
        print(f"padd: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"padd: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"padd: {e}; run the same command again to resume", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
