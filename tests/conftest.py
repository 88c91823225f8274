"""Test-wide setup: Triton kernels run in the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence here at collection time.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A private compile cache per run: a cache left by an older version of a custom op's schema
# would otherwise be served to torch.compile tests (AOT-autograd keys on the forward graph).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="padd-inductor-"))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
