"""Metrics as JSONL (one record per line, with `stage` and `step`), and TensorBoard when installed.

A resumed stage first drops the records it logged after its last checkpoint, so the file holds
each step exactly once, as if the run had never been interrupted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def read_metrics(path: str | Path, stage: str | None = None) -> list[dict[str, Any]]:
    """Every record of `path` (optionally only those of `stage`)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if stage is None or rec.get("stage") == stage:
                out.append(rec)
    return out


class MetricsLogger:
    """Append-only JSONL metrics of one run; `enabled=False` on non-zero ranks."""

    def __init__(self, path: str | Path, *, tensorboard: bool = True, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:  # optional, and slow to import: only when a run asks for it
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
                except ImportError:  # tensorboard is optional
                    self._tb = None

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop `stage`'s records with `step > step` (they are redone after a resume)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip()
            and not ((r := json.loads(line)).get("stage") == stage and r.get("step", 0) > step)
        ]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = _jsonable(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            stage, step = record.get("stage", "run"), record.get("step", 0)
            for k, v in _scalars(record):
                self._tb.add_scalar(f"{stage}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    for k, v in record.items():
        if k not in ("stage", "step") and isinstance(v, int | float) and not isinstance(v, bool):
            yield k, float(v)
