"""Checkpoints and resume: everything padd writes so that an interrupted run continues where it
stopped, bit for bit.

- Atomic files and folders: each is written under a temporary name in the same directory and
  moved into place with `os.replace` (atomic on POSIX), so a reader or a resumed run sees the old
  version or the new one, never a half-written one (`atomic_write_text`, `atomic_write_json`,
  `atomic_torch_save`, `atomic_dir`).
- `CheckpointDir`: `root/step_000123/` folders plus a `root/latest` pointer, for every loop.
- Graceful interruption: SIGINT/SIGTERM only set a flag (`GracefulInterrupt`); the loop finishes
  its step, checkpoints it and raises `Interrupted`, so a resumed run loses nothing.
- RNG: `seed_everything`, and `rng_state`/`set_rng_state` so a resume draws the same numbers.
- The trainer's checkpoint folder (`write_checkpoint`, `read_checkpoint`):
  - the student as a transformers model folder (`config.json`, `model.safetensors`). By default
    the tensors keep the live model's own names and layout (`save_original_format=False`), so a
    resume copies them into the existing model one tensor at a time, with no second model in
    memory; `from_pretrained` loads such a folder as well. `hf_layout=True` writes transformers'
    original on-disk layout instead (e.g. Mixtral's per-expert `w1/w2/w3`, what other tools
    expect), which only transformers' loader maps back: resuming from it builds a temporary
    second model;
  - `padd_router_bias.safetensors`, the selection bias (for `RoutingControl.load_selection_bias`
    on a model loaded elsewhere);
  - `padd_trainer_state.pt`, a `TrainerState` plus the weights' layout. A file without that key
    was written before the layout was recorded, always in transformers' layout, and still resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

__all__ = [
    "LATEST",
    "TRAINER_STATE_FILE",
    "Checkpoint",
    "CheckpointDir",
    "GracefulInterrupt",
    "Interrupted",
    "StateIO",
    "TrainerState",
    "atomic_dir",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "read_checkpoint",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "write_checkpoint",
]

LATEST = "latest"  # CheckpointDir's pointer file
TRAINER_STATE_FILE = "padd_trainer_state.pt"
_LAYOUT_KEY = "weights_layout"
LIVE, HF = "live", "transformers"  # how the student's tensors are stored


# -- RNG ------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python `random` and numpy."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the loops draw from, so a resumed run continues the same random stream."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore an `rng_state()` (one without "cuda", as older trainer checkpoints wrote, too)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- atomic files and folders ---------------------------------------------------------------------


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


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Let `write(tmp_dir)` fill a temporary folder, then move it to `final` atomically.

    A reader sees the old folder or the new one, never a half-written one. An existing `final`
    is moved aside first and deleted after the swap (`os.replace` cannot replace a non-empty
    directory).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        write(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# -- step folders ---------------------------------------------------------------------------------


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


# -- graceful interruption ------------------------------------------------------------------------


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


# -- the trainer's state --------------------------------------------------------------------------


@dataclass
class TrainerState:
    """Everything besides the student's weights that a bit-identical resume needs.

    Attributes:
        step: steps done.
        optimizer: the optimiser's full (unsharded) `state_dict()`.
        ema_state: Stage IV's per-expert advantage EMA, fp32 [L, E] ([0, 0] for a dense student).
        rng: `rng_state()` after the last step.
        config: `PADDConfig.to_dict()` of the run that wrote it (a record; not restored).
        selection_bias: Stage IV's selection bias, fp32 [L, E]; None for a dense student.
        reference: the reference policy's `state_dict()` (`beta > 0`), else None.
        skipped_updates: non-finite updates dropped so far.
    """

    step: int
    optimizer: dict[str, Any]
    ema_state: torch.Tensor
    rng: dict[str, Any]
    config: dict[str, Any]
    selection_bias: torch.Tensor | None = None
    reference: dict[str, torch.Tensor] | None = None
    skipped_updates: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (tensors not copied: `dataclasses.asdict` would)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainerState:
        """Build from `to_dict()` or from a checkpoint written before this class (same keys)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainerState key(s): {unknown}")
        return cls(**values)


@dataclass
class Checkpoint:
    """What `write_checkpoint` stores: the student's full (unsharded) weights and the trainer state."""

    student: dict[str, torch.Tensor]
    state: TrainerState


class StateIO:
    """How the trainer reads and writes model and optimiser state. This one is plain
    `state_dict`; a sharded (FSDP2) run swaps in one that gathers and scatters full states."""

    def model_state(self, model: torch.nn.Module) -> dict:
        return model.state_dict()

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_model_state(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Copy `state` into the model's parameters and buffers in place, one tensor at a time
        (`state` may read each from disk on access). Its keys must be exactly the model's, and
        every shape and dtype equal: no silent cast, so the copy is bit for bit."""
        live = model.state_dict()
        missing, unexpected = sorted(set(live) - set(state)), sorted(set(state) - set(live))
        if missing or unexpected:
            raise ValueError(
                f"the saved weights do not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, target in live.items():
                source = state[name]
                if source.shape != target.shape or source.dtype != target.dtype:
                    raise ValueError(
                        f"{name}: saved {source.dtype} {tuple(source.shape)}, "
                        f"model {target.dtype} {tuple(target.shape)}"
                    )
                target.copy_(source)

    def load_optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        optimizer.load_state_dict(state)


# -- the trainer's checkpoint folder --------------------------------------------------------------


def write_checkpoint(
    directory: str | os.PathLike,
    model: Any,
    checkpoint: Checkpoint,
    control: Any = None,
    *,
    hf_layout: bool = False,
) -> None:
    """Write `checkpoint` into `directory` (created if needed; not atomic: see `atomic_dir`).

    Args:
        model: the student (a transformers model; its `save_pretrained` writes the weights and
            config, `checkpoint.student` being the weights).
        control: the student's `RoutingControl`, whose selection bias is written beside, or None.
        hf_layout: store the weights in transformers' original on-disk layout (portable to other
            tools) rather than the live one (exact per-tensor resume; module doc).
    """
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, state_dict=checkpoint.student, save_original_format=hf_layout)
    if control is not None:
        control.save_selection_bias(directory)
    state = {**checkpoint.state.to_dict(), _LAYOUT_KEY: HF if hf_layout else LIVE}
    torch.save(state, os.path.join(directory, TRAINER_STATE_FILE))


def read_checkpoint(
    directory: str | os.PathLike, model: Any, state_io: StateIO | None = None
) -> TrainerState:
    """Load a checkpoint folder's weights into `model` in place (through `state_io`, default
    `StateIO()`) and return its trainer state, for the trainer to restore."""
    state_io = state_io or StateIO()
    # Our own file (RNG states hold numpy arrays, which `weights_only` refuses).
    raw = torch.load(os.path.join(directory, TRAINER_STATE_FILE), weights_only=False)
    layout = raw.pop(_LAYOUT_KEY, HF)  # older checkpoints: save_pretrained's default layout
    if layout == LIVE:
        with _stored_weights(directory, model) as weights:
            state_io.load_model_state(model, weights)
    elif layout == HF:
        # Only transformers' loader maps its on-disk layout back (e.g. per-expert tensors into
        # fused experts): a temporary second model, in the live dtype.
        dtype = next(model.parameters()).dtype
        loaded = type(model).from_pretrained(directory, dtype=dtype)
        state_io.load_model_state(model, loaded.state_dict())
        del loaded
    else:
        raise ValueError(f"{directory}: unknown weights layout {layout!r} (written by a newer padd?)")
    return TrainerState.from_dict(raw)


class _StoredWeights(Mapping[str, torch.Tensor]):
    """The tensors of a model folder's safetensors files, each read on access. A tied weight that
    `save_pretrained` left out (`lm_head.weight` tied to the embeddings) reads as its source."""

    def __init__(self, files: dict[str, Any], tied: Mapping[str, str]) -> None:
        self._files = files  # key -> open safetensors file
        self._tied = {k: src for k, src in tied.items() if k not in files and src in files}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._files[self._tied.get(key, key)].get_tensor(self._tied.get(key, key))

    def __iter__(self) -> Iterator[str]:
        yield from self._files
        yield from self._tied

    def __len__(self) -> int:
        return len(self._files) + len(self._tied)


@contextlib.contextmanager
def _stored_weights(directory: str | os.PathLike, model: Any) -> Iterator[_StoredWeights]:
    directory = Path(directory)
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():  # sharded by save_pretrained's max_shard_size
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / SAFE_WEIGHTS_NAME).is_file():
        names = [SAFE_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {directory}")
    with contextlib.ExitStack() as stack:
        files = {}
        for name in names:
            f = stack.enter_context(safe_open(directory / name, framework="pt"))
            files.update(dict.fromkeys(f.keys(), f))
        yield _StoredWeights(files, model.all_tied_weights_keys)  # set by every PreTrainedModel
