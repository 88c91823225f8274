"""Atomic checkpoints and graceful interruption.

Every file or folder is first written under a temporary name in the same directory and then moved
into place with `os.replace`, which is atomic on POSIX: a reader (or a resumed run) sees either the
old version or the new one, never a half-written file. SIGINT/SIGTERM only set a flag; the training
loop finishes its current step, checkpoints it, and exits, so a resumed run loses nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# One implementation of each, in the training layer; re-exported for the pipeline's loops.
from padd.training.checkpointing import atomic_dir, rng_state, seed_everything, set_rng_state

__all__ = [
    "LATEST",
    "CheckpointDir",
    "GracefulInterrupt",
    "Interrupted",
    "atomic_dir",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]

LATEST = "latest"


class Interrupted(Exception):
    """Raised by a loop after it checkpointed in response to SIGINT/SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint written")
        self.signum = signum


class GracefulInterrupt:
    """Context manager: SIGINT/SIGTERM set `requested`; a second signal aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: the user insists
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def check(self) -> None:
        """Raise `Interrupted` if a signal arrived (call right after a checkpoint was written)."""
        if self.signum is not None:
            raise Interrupted(self.signum)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CheckpointDir:
    """`root/step_000123/` folders plus a `root/latest` pointer, written atomically.

    `keep` bounds disk use: older step folders are deleted after a new one is in place.
    """

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        path = atomic_dir(self.root / f"step_{step:06d}", write)
        atomic_write_text(self.root / LATEST, path.name + "\n")
        self._prune()
        return path

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for p in steps[: max(0, len(steps) - self.keep)]:
            shutil.rmtree(p, ignore_errors=True)
