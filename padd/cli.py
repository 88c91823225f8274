"""The `padd` command (also `python -m padd`).

    padd train CONFIG [--compare] [--force] [key.sub=value ...]
    padd config CONFIG [key.sub=value ...] | padd config --reference
    padd eval CONFIG|RUN_DIR [--model DIR] [--out FILE] [key.sub=value ...]
    padd convert CONFIG --out DIR [key.sub=value ...]
    padd flops TEACHER_DIR [STUDENT_DIR] [--seq-len N]
    padd report RUN_DIR [RUN_DIR ...]
    padd export-teacher RUN_DIR [--out DIR]

CONFIG is a preset name (`small`, `tiny`, ...) or a path to a YAML file; `padd eval` also takes a
run directory (its `config.yaml`). Errors in the config, the data or a model directory are one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from padd import flops
from padd.config import (
    ConfigError,
    PADDRunConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    preset_names,
    read_config_source,
)
from padd.config_docs import annotated_yaml, reference_markdown
from padd.data.jsonl import DataError
from padd.pipeline.evaluate import evaluate_model
from padd.pipeline.inputs import RunInputs, load_model, preflight
from padd.pipeline.report import render_seeds_markdown, write_report
from padd.pipeline.run import Pipeline, run_train
from padd.pipeline.run_dir import RunDir
from padd.pipeline.shipped_teacher import SHIPPED_TEACHER_DIR, export_teacher
from padd.pipeline.stage1 import build_student
from padd.training.checkpointing import GracefulInterrupt, Interrupted, atomic_write_json


class ModelPathError(Exception):
    """A model directory that is missing or is not a loadable HF model (config.json + weights)."""


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _config_args(p: argparse.ArgumentParser, run_dir: bool = False) -> None:
    presets = f"preset name ({', '.join(preset_names())})"
    if run_dir:
        p.add_argument("config", help=f"{presets}, path to a YAML file, or run directory")
    else:
        p.add_argument("config", help=f"{presets} or path to a YAML file")
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

    p = sub.add_parser("config", help="print a resolved config, one doc line per key",
                       description="Print the config a preset or YAML file resolves to (defaults, base "
                       "chain and overrides applied), as YAML with a one-line doc per key; the output "
                       "loads back as a config. --reference prints docs/config.md instead.")  # fmt: skip
    p.add_argument(
        "config", nargs="?", help=f"preset name ({', '.join(preset_names())}) or path to a YAML file"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. training.steps=50"
    )
    p.add_argument(
        "--reference", action="store_true", help="print every key's default and doc (docs/config.md)"
    )

    p = sub.add_parser("eval", help="held-out accuracy of a model", description="Greedy pass@1 of a model "
                       "on the run's held-out split D_D (default: the run's trained student). Reads the "
                       "run directory and never writes to it; the config may differ from the run's in "
                       "eval.* only (e.g. eval.num_problems=50).")  # fmt: skip
    _config_args(p, run_dir=True)
    p.add_argument("--model", help="model directory (default: RUN_DIR/train/final)")
    p.add_argument("--out", help="also write the result (with sample completions) to this JSON file")

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

    p = sub.add_parser("export-teacher", help="ship a run's trained teacher (teacher.source=shipped)",
                       description="Copy the teacher a finished run trained here (teacher.source=train) "
                       "into padd/assets/teacher/ (or --out), with padd_teacher.json: the settings it "
                       "was trained with and its answers on the run's held-out split.")  # fmt: skip
    p.add_argument("run_dir", help="a finished run directory whose teacher was trained here")
    p.add_argument("--out", help="destination (default: the package's padd/assets/teacher)")

    p = sub.add_parser("report", help="(re)build report.md/report.json/plots of a run",
                       description="Build the report of each run directory from its files; with several "
                       "(e.g. one per seed) also print every run's accuracy and mean ± std.")  # fmt: skip
    p.add_argument("run_dir", nargs="+", help="run directory (several: one table over them)")
    p.add_argument("--markdown", action="store_true", help="only print the seed table (run directories "
                   "or saved report.json files, e.g. research/runs/*.json); write nothing")  # fmt: skip
    return parser


# ---- checks before any compute ------------------------------------------------------------------


def _pretrained_dirs(cfg: PADDRunConfig) -> list[tuple[str, str]]:
    """(key, path) of the local models a config loads."""
    out = []
    if cfg.teacher.source == "pretrained":
        out.append(("teacher.path", cfg.teacher.path))
    if cfg.student.source == "pretrained":
        out.append(("student.path", cfg.student.path))
    return out


def _check_model_dir(path: str | Path, what: str, *, weights: bool = True) -> None:
    """Raise `ModelPathError` unless `path` holds an HF model: a valid config.json and weights."""
    p = Path(path)
    if not p.exists():
        raise ModelPathError(f"{what}: no such directory: {p}")
    if not p.is_dir():
        raise ModelPathError(f"{what}: not a directory: {p}")
    config = p / "config.json"
    if not config.is_file():
        raise ModelPathError(f"{what}: no config.json in {p} (not an HF model directory)")
    try:
        meta = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ModelPathError(f"{what}: {config} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "model_type" not in meta:
        raise ModelPathError(f"{what}: {config} names no model_type")
    if weights and not any((p / name).is_file() for name in _WEIGHT_FILES):
        raise ModelPathError(f"{what}: no weights in {p} (model.safetensors or pytorch_model.bin)")


def _check_inputs(cfg: PADDRunConfig) -> None:
    """The file-level checks of `padd.pipeline.inputs.preflight`, plus the model directories'
    contents, so that a broken model directory is one line and not a traceback from transformers."""
    for key, path in _pretrained_dirs(cfg):
        # A missing directory or config.json is the preflight's `<key>: ... not found` config error;
        # an unreadable config.json must be caught first (the preflight parses it).
        if (Path(path) / "config.json").is_file():
            _check_model_dir(path, key, weights=False)
    preflight(cfg)
    for key, path in _pretrained_dirs(cfg):
        _check_model_dir(path, key)


def _read_only_inputs(cfg: PADDRunConfig, device: torch.device | None = None) -> RunInputs:
    """The run's inputs (problems, splits, tokenizer, teacher) for the checks before compute and
    for `padd eval`: unlike `Pipeline`, this neither creates nor rewrites anything in the run
    directory."""
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    return RunInputs.read_only(cfg, device)


def _check_data(inputs: RunInputs) -> None:
    """Load the problems and cut the splits now: a bad data file or too few problems is a one-line
    `DataError` before any compute (the pipeline itself would cut the splits after the teacher)."""
    cfg = inputs.cfg
    try:
        inputs.problems  # noqa: B018 -- loads them; the file loaders raise DataError themselves
    except ValueError as e:
        if isinstance(e, DataError) or cfg.data.source != "synthetic":
            raise
        raise DataError(f"synthetic data: {e}") from None  # cannot draw that many distinct problems
    try:
        inputs.splits  # noqa: B018 -- cuts them
    except ValueError as e:  # e.g. "need at least 4 distinct problems, got 3"
        raise DataError(f"{cfg.data.path or cfg.data.source + ' data'}: {e}") from None


def _eval_config(config: str, overrides: list[str]) -> PADDRunConfig:
    """`padd eval`'s config: a preset or YAML file, or a run directory (its config.yaml, run.dir
    set to that directory), then the overrides."""
    run_dir = Path(config)
    if not run_dir.is_dir():
        return load_config(config, overrides)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("", f"{run_dir} is a directory without config.yaml (not a run directory)")
    data = read_config_source(str(run_dir / "config.yaml"))
    data.setdefault("run", {})["dir"] = str(run_dir)
    try:
        config_from_dict(copy.deepcopy(data))  # the run's own config, before the overrides
    except ConfigError as e:
        if "unknown key" in e.message:  # a run written before (or after) a config change
            raise ConfigError(
                e.key, f"{e.message}; {run_dir}/config.yaml was written by another padd version"
            ) from None
        raise
    return config_from_dict(apply_overrides(data, overrides))


# ---- commands -----------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    _check_inputs(cfg)
    _check_data(_read_only_inputs(cfg))
    out = run_train(cfg, force=args.force, compare=args.compare)
    if (out / "report.md").exists():
        print(f"[padd] report: {out / 'report.md'}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        if args.config or args.overrides:
            raise ConfigError("--reference", "takes no config: it prints every key's default")
        print(reference_markdown(), end="")
        return 0
    if not args.config:
        raise ConfigError("", "name a preset or a YAML file (or pass --reference)")
    print(annotated_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    cfg = _eval_config(args.config, args.overrides)
    RunDir(cfg.run.dir).check_eval_config(cfg)
    _check_inputs(cfg)
    run_dir = RunDir(cfg.run.dir)
    if args.model:
        model = Path(args.model)
        _check_model_dir(model, "--model")
    else:
        model = run_dir.train.final
        if not model.exists():
            raise ModelPathError(f"no trained student at {model}; run `padd train` first, or pass --model")
        _check_model_dir(model, "trained student")
    out = Path(args.out) if args.out else None
    if out is not None and run_dir.root.resolve() in out.resolve().parents:
        raise ConfigError("--out", f"{out} is inside the run directory, which `padd eval` never writes")
    # Evaluation is generation-bound: on the GPU when there is one.
    inputs = _read_only_inputs(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    _check_data(inputs)
    moe = (model / "padd_router_bias.safetensors").exists()
    with tempfile.TemporaryDirectory() as tmp:  # no cache: the run's own eval/*.json stay untouched
        res = evaluate_model(
            model,
            "eval",
            Path(tmp),
            moe=moe,
            cfg=cfg,
            tokenizer=inputs.tokenizer,
            problems=inputs.eval_problems(),
            load_teacher=inputs.load_teacher,
        )
    res["model"] = str(model)
    if out is not None:
        atomic_write_json(out, res)
    res.pop("samples", None)
    print(json.dumps(res, indent=2))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    _check_inputs(cfg)
    _check_data(_read_only_inputs(cfg))
    pipe = Pipeline(cfg)
    try:
        pipe.run(until="teacher")
        run = pipe.inputs
        with GracefulInterrupt() as interrupt:
            info = build_student(
                cfg, run.load_teacher(), run.tokenizer, run.split("A"), run.split("B"),
                Path(args.out), interrupt, pipe.metrics.log, warmup_experts=False,
            )  # fmt: skip
    finally:
        pipe.close()
    print(json.dumps(info, indent=2))
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    _check_model_dir(args.teacher, "TEACHER_DIR")
    if args.student:
        _check_model_dir(args.student, "STUDENT_DIR")
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
    if args.markdown:  # the table of docs/results.md, from run directories or saved report.json files
        print(render_seeds_markdown(args.run_dir))
        return 0
    for run_dir in args.run_dir:
        write_report(run_dir)
        print(f"[padd] report: {Path(run_dir) / 'report.md'}")
    if len(args.run_dir) > 1:  # several seeds of one config: every seed and mean ± std
        print(render_seeds_markdown(args.run_dir))
    return 0


def _cmd_export_teacher(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else SHIPPED_TEACHER_DIR
    record = export_teacher(Path(args.run_dir), out)
    held_out = record["held_out"]
    print(
        f"[padd] teacher exported to {out}: {held_out['accuracy']:.1%} on {held_out['n']} held-out problems"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for config, data and model-directory errors,
    128+signal when interrupted)."""
    parser = build_parser()
    # Overrides may follow the flags (`padd train tiny --force a.b=1`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    hf_logging.disable_progress_bar()  # per-file load/save bars; ours are tqdm on long work
    commands = {
        "train": _cmd_train,
        "config": _cmd_config,
        "eval": _cmd_eval,
        "convert": _cmd_convert,
        "flops": _cmd_flops,
        "report": _cmd_report,
        "export-teacher": _cmd_export_teacher,
    }
    try:
        return commands[args.command](args)
    except ConfigError as e:
        print(f"padd: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"padd: data error: {e}", file=sys.stderr)
        return 2
    except ModelPathError as e:
        print(f"padd: model error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"padd: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"padd: {e}; run the same command again to resume", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
