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


def pytest_runtest_logreport(report):
    """With PADD_FAIL_LOG=path, each failure's traceback is appended to that file as it happens
    (by the xdist controller only, not its workers), so a run cut off by a time limit, as on a
    lent GPU, still says why its tests failed: pytest itself prints tracebacks at the end."""
    path = os.environ.get("PADD_FAIL_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
