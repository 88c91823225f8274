"""Offline sm_90 compilation of Triton kernels, for CPU-only machines.

The Triton interpreter never runs the code generator, so a kernel can pass every CPU test and
still fail to lower for a GPU. Each kernel test file hands its own compile script to this runner;
the grouped-GEMM kernels' scripts start from `GROUPED_GEMM_SM90_PRELUDE`.
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


# The start of a compile script for `padd.kernels.grouped_gemm.triton` (imported as `gt`):
# `compile_sm90(kernel, consts, warps)` lowers one kernel to sm_90 with bf16 tensors, fp32 for the
# routing weights and the fp32 partials, int32 for the permutation metadata.
GROUPED_GEMM_SM90_PRELUDE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from padd.kernels.grouped_gemm import triton as gt

FLOATS = {"LIMIT", "ALPHA"}
INT_PTRS = {"order_ptr", "offsets_ptr"}
FP32_PTRS = {"weight_ptr", "dweight_part_ptr", "dot_part_ptr", "scale_ptr"}

def compile_sm90(kernel, consts, warps=8):
    def kind(n):
        if n in consts:
            return "constexpr"
        if n.endswith("_ptr"):
            return "*i32" if n in INT_PTRS else "*fp32" if n in FP32_PTRS else "*bf16"
        return "fp32" if n in FLOATS else "i32"
    sig = {n: kind(n) for n in kernel.arg_names}
    src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(n),): v for n, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
"""
