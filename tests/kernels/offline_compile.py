"""Offline sm_90 compilation of Triton kernels, for CPU-only machines.

The Triton interpreter never runs the code generator, so a kernel can pass every CPU test and
still fail to lower for a GPU. Each kernel test file hands its own compile script to this runner.
"""

import os
import subprocess
import sys

import pytest


def assert_compiles_offline_for_sm90(script: str) -> None:
    """Run `script` (which prints "compiled" at the end) with the interpreter off; skip without ptxas."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, "-c", script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas for an offline sm_90 compile")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
