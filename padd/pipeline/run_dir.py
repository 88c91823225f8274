"""One run directory: where each artifact of a run lives, the `done/<step>.json` markers that make a
run resumable, and the check that a directory was made by the same configuration.

Layout: `lock` (held by the run's one writer: `padd.pipeline.run_lock`), `config.yaml` (resolved)
+ `fingerprint`, `metrics.jsonl`, `tokenizer/`, `data/`, `stage1/student/`, `train/ckpt/`,
`train/final/`, `train/ranks/rank<r>/`, `eval/*.json`, `compare/<method>/` (the same training
layout, plus `stage1/` and `eval.json`), `report.md`, `report.json`, `plots/*.png`,
`done/<step>.json` and `partial/<step>.json` (wall time of a step's interrupted attempts).

Nothing here writes unless asked to (`prepare`, `mark_done`, `save_partial`): `padd eval` opens a
run with `RunDir` alone and leaves it untouched.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from padd.config import ConfigError, PADDRunConfig, config_from_dict, dump_config
from padd.training.checkpointing import atomic_write_json, atomic_write_text

# The file a run directory's one writer locks (`padd.pipeline.run_lock`).
LOCK_FILE = "lock"

# The steps of `padd train`, in order; each leaves `done/<step>.json` when it finishes.
STEPS = ("teacher", "data", "stage1", "train", "eval", "report")


class RunDirError(ConfigError):
    """The run directory belongs to a different configuration."""


@dataclass(frozen=True)
class TrainDir:
    """Where one Stages II–IV training writes: `ckpt/` (resumable checkpoints), `final/` (the
    trained model) and, in a multi-rank run, `ranks/rank<r>/` (per-rank evidence)."""

    root: Path

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def final(self) -> Path:
        return self.root / "final"

    def rank(self, rank: int) -> Path:
        return self.root / "ranks" / f"rank{rank}"


@dataclass(frozen=True)
class CompareDir(TrainDir):
    """`compare/<method>/`: a training's layout, plus the Stage-I ablation's own student
    (`stage1/`) and the method's result (`eval.json`, written last: its presence means done)."""

    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def result(self) -> Path:
        return self.root / "eval.json"


class RunDir:
    """The paths and bookkeeping of one run directory (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- paths -----------------------------------------------------------------------------------

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def stage1_student(self) -> Path:
        return self.root / "stage1" / "student"

    @property
    def train(self) -> TrainDir:
        return TrainDir(self.root / "train")

    @property
    def eval(self) -> Path:
        """`eval/<model>.json` per evaluated model, plus `flops.json` and `summary.json`."""
        return self.root / "eval"

    @property
    def eval_flops(self) -> Path:
        return self.eval / "flops.json"

    @property
    def eval_summary(self) -> Path:
        return self.eval / "summary.json"

    def compare(self, method: str) -> CompareDir:
        return CompareDir(self.root / "compare" / method)

    def compare_results(self) -> list[Path]:
        """`compare/<method>/eval.json` of every finished comparison, sorted by method."""
        return sorted((self.root / "compare").glob("*/eval.json"))

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def done_file(self, step: str) -> Path:
        return self.root / "done" / f"{step}.json"

    def partial_file(self, step: str) -> Path:
        return self.root / "partial" / f"{step}.json"

    # -- step markers ----------------------------------------------------------------------------

    def is_done(self, step: str) -> bool:
        return self.done_file(step).exists()

    def done_record(self, step: str) -> dict[str, Any] | None:
        """The record `step` left when it finished, or None while it is not done."""
        path = self.done_file(step)
        return json.loads(path.read_text()) if path.is_file() else None

    def read_done(self) -> dict[str, dict[str, Any]]:
        """Every step's `done/<step>.json` record (wall time and what the step reported)."""
        return {p.stem: json.loads(p.read_text()) for p in sorted((self.root / "done").glob("*.json"))}

    def mark_done(self, step: str, wall_s: float, extra: dict[str, Any]) -> None:
        """Record `step` as done (atomically: a resumed run sees the marker whole or not at all)."""
        atomic_write_json(self.done_file(step), {"wall_s": wall_s, **extra})

    def partial_wall_s(self, step: str) -> float:
        """Seconds spent in `step`'s interrupted attempts so far (0 when none)."""
        path = self.partial_file(step)
        return json.loads(path.read_text())["wall_s"] if path.exists() else 0.0

    def save_partial(self, step: str, wall_s: float) -> None:
        atomic_write_json(self.partial_file(step), {"wall_s": wall_s})

    # -- the configuration that made the run -----------------------------------------------------

    def recorded_fingerprint(self) -> str | None:
        return self.fingerprint.read_text().strip() if self.fingerprint.is_file() else None

    def prepare(self, cfg: PADDRunConfig, *, force: bool = False) -> None:
        """Create the run dir, or check that an existing one was made by the same config; then
        (re)write its `config.yaml` and `fingerprint`. With `force`, a run dir from a different
        config is wiped and restarted (all but its `lock`, which the caller holds)."""
        old = self.recorded_fingerprint()
        if old is not None and old != cfg.fingerprint():
            if not force:
                raise RunDirError(
                    "run.dir",
                    f"{self.root} was made by a different config (fingerprint {old} != "
                    f"{cfg.fingerprint()}); use --force to restart it, or set run.dir=...",
                )
            for entry in self.root.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_yaml, dump_config(cfg))
        atomic_write_text(self.fingerprint, cfg.fingerprint() + "\n")

    def check_eval_config(self, cfg: PADDRunConfig) -> None:
        """`padd eval` takes the run's config with any eval.* changed: raise `RunDirError` for
        anything else (other data or models would make D_D or the student someone else's).
        A directory without a fingerprint (no run there) matches any config."""
        recorded = self.recorded_fingerprint()
        if recorded is None:
            return
        probe = cfg
        try:
            data = yaml.safe_load(self.config_yaml.read_text())
            run_cfg = config_from_dict(data) if isinstance(data, dict) else None
        except (OSError, yaml.YAMLError, ConfigError):  # missing, or written by another padd version
            run_cfg = None
        if run_cfg is not None:
            probe = dataclasses.replace(cfg, eval=run_cfg.eval)
        if probe.fingerprint() != recorded:
            raise RunDirError(
                "run.dir",
                f"{self.root} was made by a different config (fingerprint {recorded}); `padd eval` may "
                "change eval.* only: pass the run's config (or the run directory) plus eval.* overrides",
            )


def read_done(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The `done/<step>.json` records of a run (wall time per step)."""
    return RunDir(run_dir).read_done()
