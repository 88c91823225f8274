"""Kernel tests run their Triton backend on CUDA when a GPU is present.

On a CPU machine the kernels run in the Triton interpreter (see tests/conftest.py). On a GPU
machine there is no interpreter, so every test that does not pin the CPU builds its inputs on
the GPU: the helpers create tensors on the *default* device and this fixture makes that CUDA.
"""

import pytest
import torch

# Tests that exercise the CPU path on purpose (CPU op backward, CPU autocast, CPU compile).
_CPU_ONLY = ("cpu", "autocast")


@pytest.fixture(autouse=True)
def _default_device_for_triton(request):
    cpu_only = any(s in request.node.name for s in _CPU_ONLY)
    if not torch.cuda.is_available() or "gpu" in request.keywords or cpu_only:
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)
