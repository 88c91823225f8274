"""Backend selection shared by every kernel: Triton on CUDA, the PyTorch reference elsewhere.

`backend="auto"` picks Triton for CUDA tensors and the reference otherwise. `backend="triton"`
forces the kernel, which also runs on CPU tensors under `TRITON_INTERPRET=1` (tests only).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference")


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (it may still lack a GPU)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map a user's `backend` argument to "triton" or "reference", with a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the `triton` package")
        if not on_cuda and not interpreter_enabled():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before import)")
        return "triton"
    return "triton" if on_cuda and triton_available() else "reference"
