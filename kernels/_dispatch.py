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


def call_reference_directly(resolved: str, *tensors: torch.Tensor) -> bool:
    """True when a reference-backend call may skip its custom op: eager, CPU tensors, no gradient.

    The custom ops exist for torch.compile and autograd (their hand-written backward); in eager
    inference (generation, evaluation) their Python dispatch costs ~0.1 ms a call, a visible share
    of a small model's decode step on CPU. FlopCounterMode then counts the reference's own GEMMs,
    the same FLOPs as the op's formula.
    """
    real = [t for t in tensors if t is not None]
    # Meta and fake tensors keep the op, whose fake impl gives them shapes.
    if resolved != "reference" or torch.compiler.is_compiling() or any(t.device.type != "cpu" for t in real):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in real))


def cpu_eager(resolved: str, *tensors: torch.Tensor) -> bool:
    """True when a reference-backend call may run as plain eager code, gradient or not: CPU
    tensors, not under torch.compile, and no dispatch mode active (FlopCounterMode, fake
    tensors and other modes keep seeing the custom op, its FLOP formula and its fake impl).

    A `torch.library` custom op with registered autograd costs ~0.2 ms of Python dispatch a
    call (measured on 2 CPU cores), as much as the whole loss at the default's shapes; an
    `autograd.Function` over the same reference functions costs a third of that.
    """
    if resolved != "reference" or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    for t in tensors:  # (a loop of `is_cpu`: a few microseconds less than `all(... device.type ...)`)
        if t is not None and not t.is_cpu:
            return False
    return True
