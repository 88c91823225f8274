"""The dense teacher that ships inside the package, so the embedded default distils the same
teacher on every machine instead of training one whose weights depend on the CPU it ran on.

`teacher.source: shipped` loads it from `padd/assets/teacher/`. It was made by
`padd export-teacher RUN_DIR`, from a run with `teacher.source=train`: the command copies the
run's trained teacher and writes `padd_teacher.json` beside it (the settings it was trained with,
their cache key, and its held-out accuracy in that run). A config whose teacher section, data or
seed would train a different teacher is refused before any compute: it needs
`teacher.source=train`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from padd.config import ConfigError, PADDRunConfig, config_from_dict
from padd.pipeline.teacher import teacher_cache_key
from padd.training.checkpointing import atomic_dir

SHIPPED_TEACHER_DIR = Path(__file__).resolve().parents[1] / "assets" / "teacher"
PROVENANCE_FILE = "padd_teacher.json"
# What a Hugging Face model directory of the tiny teacher holds (weights, config, tokenizer).
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def trained_teacher_key(cfg: PADDRunConfig) -> str:
    """The cache key of the teacher `teacher.source=train` would train for `cfg`."""
    return teacher_cache_key(
        dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, source="train"))
    )


def shipped_teacher_record(directory: Path = SHIPPED_TEACHER_DIR) -> dict[str, Any]:
    """The provenance the shipped teacher was exported with (`padd_teacher.json`)."""
    path = directory / PROVENANCE_FILE
    if not path.is_file():
        raise ConfigError("teacher.source", f"no shipped teacher: {path} is missing (reinstall padd)")
    return json.loads(path.read_text())


def check_shipped_teacher(cfg: PADDRunConfig, directory: Path = SHIPPED_TEACHER_DIR) -> None:
    """Refuse, naming the key, a config whose teacher is not the shipped one."""
    record = shipped_teacher_record(directory)
    if record["cache_key"] != trained_teacher_key(cfg):
        raise ConfigError(
            "teacher.source",
            "the shipped teacher was trained for other teacher or data settings (or data.problem_seed) "
            f"({record['command']}); set teacher.source=train to train this config's teacher",
        )


def export_teacher(run_dir: Path, out: Path = SHIPPED_TEACHER_DIR) -> dict[str, Any]:
    """Copy the teacher a finished run trained into `out` (atomically), with its provenance.

    The run must have trained its teacher here (`teacher.source=train`) and evaluated it, so
    the accuracy recorded beside the weights is the one this teacher scored on that run's D_D.
    """
    run_dir = Path(run_dir)
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    teacher_done = json.loads((run_dir / "done" / "teacher.json").read_text())
    evaluation = json.loads((run_dir / "eval" / "teacher.json").read_text())
    if cfg.teacher.source != "train":
        raise ConfigError(
            "teacher.source", f"{run_dir} did not train its teacher (source {cfg.teacher.source!r})"
        )
    source = Path(teacher_done["path"])
    record = {
        "cache_key": trained_teacher_key(cfg),
        "command": f"padd train CONFIG teacher.source=train data.problem_seed={cfg.problem_seed}; "
        "padd export-teacher RUN_DIR",
        "teacher": dataclasses.asdict(cfg.teacher),
        "data": {
            "source": cfg.data.source,
            "num_problems": cfg.data.num_problems,
            "kinds": list(cfg.data.kinds),
        },
        "problem_seed": cfg.problem_seed,
        # D_D of that run, problem by problem ("1" right, "0" wrong), so a check can compare answers.
        "held_out": {
            "accuracy": evaluation["accuracy"],
            "n": evaluation["n"],
            "correct": evaluation["correct"],
        },
    }

    def write(tmp: Path) -> None:
        for name in _MODEL_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    atomic_dir(out, write)
    return record
