"""MoE expert FFN benchmark: padd `moe_ffn` against its peers, side by side in one process.

    python -m pytest benchmarks/bench_moe_ffn.py -s          (PADD_BENCH_OUT=dir writes JSON)

Peers: the transformers eager loop (`experts_implementation="eager"`), transformers
`grouped_mm` (torch._grouped_mm), MegaBlocks' dMoE and Liger's fused MoE when importable
(skipped with the reason printed otherwise). All use the same HF-layout weights and the same
top-k decisions; padd's timing includes building its routing metadata (`routing_from_topk`),
as transformers' `grouped_mm` sorts inside its forward. MegaBlocks brings its own router, so its
time also includes a (tiny) router GEMM and top-k.

Figures: TFLOP/s over the useful expert FLOPs (forward 2·T·k·H·3I, forward+backward three times
that), % of the GPU's bf16 peak, peak memory, and padd's speed-up over each peer. On CPU the
shapes are tiny and the rows are labelled CPU: they check that the suite runs, nothing more.

Shape legend: T tokens, H hidden, I expert width, E experts, k top_k.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from padd.kernels import moe_ffn, moe_ffn_reference, routing_from_topk
from padd.kernels.grouped_gemm import moe_ffn_flops

from benchmarks.common import (
    bench_device,
    make_record,
    on_gpu,
    peak_memory_mb,
    print_table,
    time_fn,
    write_results,
)

SUITE = "moe_ffn"
# (name, H, I, E, k) from shared/docs/kernel-anchors.md section 2.
MODELS = [
    ("mixtral-8x7b", 4096, 14336, 8, 2),
    ("qwen3-30b-a3b", 2048, 768, 128, 8),
    ("olmoe-1b-7b", 2048, 1024, 64, 8),
    ("deepseek-v2-lite", 2048, 1408, 64, 6),
    ("anchor-30b", 4096, 1024, 64, 4),
]
# PADD_BENCH_TOKENS="4096,16384" and PADD_BENCH_MODELS="olmoe-1b-7b,..." narrow a GPU run, e.g.
# to fit one device call.
_TOKENS = [int(t) for t in os.environ.get("PADD_BENCH_TOKENS", "4096,16384,32768").split(",")]
_MODELS = os.environ.get("PADD_BENCH_MODELS", ",".join(m[0] for m in MODELS)).split(",")
GPU_SHAPES = [(name, t, h, i, e, k) for name, h, i, e, k in MODELS if name in _MODELS for t in _TOKENS]
CPU_SHAPES = [("tiny-cpu", 256, 128, 64, 8, 2), ("tiny-cpu-many-experts", 128, 64, 32, 32, 4)]
SHAPES = GPU_SHAPES if on_gpu() else CPU_SHAPES
DTYPE = torch.bfloat16 if on_gpu() else torch.float32
_REPS = {"warmup": 2, "reps": 5}
_RECORDS: list = []


class Problem:
    """One benchmark problem: activations, HF-layout weights and top-k decisions."""

    def __init__(self, num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int):
        device = bench_device()
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.x_TH = torch.randn(num_tokens, hidden, generator=gen).to(device, DTYPE)
        self.w13_E2IH = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(
            device, DTYPE
        )
        self.w2_EHI = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(device, DTYPE)
        logits_TE = torch.randn(num_tokens, num_experts, generator=gen).to(device)
        weights_TK, experts_TK = logits_TE.softmax(dim=-1).topk(top_k, dim=-1)
        self.experts_TK = experts_TK.int()
        self.weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        self.grad_TH = torch.randn(num_tokens, hidden, generator=gen).to(device, DTYPE)
        self.flops = moe_ffn_flops(num_tokens, top_k, hidden, inter)

    def leaves(self) -> list[torch.Tensor]:
        """Fresh differentiable copies of (x, gate_up_proj, down_proj, weights)."""
        return [
            t.detach().clone().requires_grad_()
            for t in (self.x_TH, self.w13_E2IH, self.w2_EHI, self.weights_TK)
        ]


def padd_impl(p: Problem) -> Callable:
    def run(x, w13, w2, weights):
        return moe_ffn(x, w13, w2, routing_from_topk(p.experts_TK, weights, w13.shape[0]))

    return run


def _hf_experts(p: Problem, implementation: str):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    num_experts, two_inter, hidden = p.w13_E2IH.shape
    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=two_inter // 2, num_experts=num_experts,
        num_experts_per_tok=p.experts_TK.shape[1],
    )  # fmt: skip
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = Qwen3MoeExperts(config)
    # The benchmark's weights go in as plain tensors (no copy, same storage), not Parameters.
    del module.gate_up_proj, module.down_proj

    def run(x, w13, w2, weights):
        module.gate_up_proj, module.down_proj = w13, w2
        return module(x, p.experts_TK.long(), weights.to(x.dtype))

    return run


def hf_impl(implementation: str) -> Callable[[Problem], tuple[Callable | None, str]]:
    def build(p: Problem):
        try:
            return _hf_experts(p, implementation), ""
        except Exception as exc:
            return None, f"transformers experts ({implementation}) unavailable ({type(exc).__name__}: {exc})"

    return build


def liger_impl(p: Problem) -> tuple[Callable | None, str]:
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception as exc:
        return None, f"Liger fused MoE not importable ({type(exc).__name__}: {exc})"
    if not on_gpu():
        return None, "Liger's fused MoE needs CUDA"

    def run(x, w13, w2, weights):
        return LigerFusedMoEFunction.apply(x, w13, w2, p.experts_TK, weights.to(x.dtype))

    return run, ""


def megablocks_impl(p: Problem) -> tuple[Callable | None, str]:
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as exc:
        return None, f"MegaBlocks not importable ({type(exc).__name__}: {exc})"
    if not on_gpu():
        return None, "MegaBlocks needs CUDA"
    num_experts, two_inter, hidden = p.w13_E2IH.shape
    try:
        args = Arguments(
            hidden_size=hidden, ffn_hidden_size=two_inter // 2, moe_num_experts=num_experts,
            moe_top_k=p.experts_TK.shape[1], mlp_type="glu", mlp_impl="grouped", activation_fn=F.silu,
            bf16=DTYPE == torch.bfloat16, fp16=False, device=torch.cuda.current_device(), return_bias=False,
        )  # fmt: skip
        layer = dMoE(args)
    except Exception as exc:
        return None, f"MegaBlocks dMoE could not be built ({type(exc).__name__}: {exc})"

    def run(x, w13, w2, weights):
        # dMoE routes by itself: its own router picks the experts, the weights are its own.
        out = layer(x.view(x.shape[0], 1, -1))
        return out[0] if isinstance(out, tuple) else out

    return run, ""


PEERS = [
    ("transformers eager", hf_impl("eager")),
    ("transformers grouped_mm", hf_impl("grouped_mm")),
    ("MegaBlocks dMoE", megablocks_impl),
    ("Liger fused MoE", liger_impl),
]


def _forward(fn: Callable, p: Problem) -> Callable[[], object]:
    inputs = [t.detach() for t in (p.x_TH, p.w13_E2IH, p.w2_EHI, p.weights_TK)]

    def step():
        with torch.no_grad():
            return fn(*inputs)

    return step


def _forward_backward(fn: Callable, p: Problem) -> Callable[[], object]:
    leaves = p.leaves()

    def step():
        out = fn(*leaves)
        params = [t for t in leaves if t.requires_grad]
        return torch.autograd.grad(out, params, p.grad_TH, allow_unused=True)

    return step


def _check_padd(p: Problem) -> None:
    """No speed-up is reported for a kernel that disagrees with its reference."""
    routing = routing_from_topk(p.experts_TK, p.weights_TK, p.w13_E2IH.shape[0])
    got = moe_ffn(p.x_TH, p.w13_E2IH, p.w2_EHI, routing).float()
    want = moe_ffn_reference(p.x_TH, p.w13_E2IH, p.w2_EHI, routing).float()
    rel_rms = ((got - want).square().mean() / want.square().mean().clamp_min(1e-30)).sqrt().item()
    assert rel_rms < 2e-2, f"padd moe_ffn disagrees with its reference (relative RMS {rel_rms:.3g})"


def _measure(op: str, name: str, step: Callable, shape: dict, flops: int):
    try:
        timing = time_fn(step, **_REPS)
        mem = peak_memory_mb(step)
    except Exception as exc:  # a peer whose API moved or ran out of memory: report, do not fail
        print(f"skip {name} {op} {shape}: failed ({type(exc).__name__}: {str(exc)[:200]})")
        return None
    finally:
        if on_gpu():
            torch.cuda.empty_cache()
    return make_record(SUITE, op, name, shape, timing, flops=flops, peak_mem_mb=mem)


def _print_speedups(records: list) -> None:
    padd = next((r for r in records if r.impl.startswith("padd")), None)
    if padd is None:
        return
    for r in records:
        if r is not padd:
            speedup = r.median_ms / padd.median_ms
            r.extra["padd_speedup"] = speedup
            print(f"  {padd.op} {padd.shape['model']} T={padd.shape['T']}: padd is {speedup:.2f}x {r.impl}")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if _RECORDS:
        print_table(_RECORDS)
        if os.environ.get("PADD_BENCH_OUT"):
            print("results:", write_results(SUITE, _RECORDS))


@pytest.mark.parametrize("model,num_tokens,hidden,inter,num_experts,top_k", SHAPES)
def test_bench_moe_ffn(model, num_tokens, hidden, inter, num_experts, top_k):
    p = Problem(num_tokens, hidden, inter, num_experts, top_k)
    _check_padd(p)
    shape = {"model": model, "T": num_tokens, "H": hidden, "I": inter, "E": num_experts, "k": top_k,
             "dtype": str(DTYPE).removeprefix("torch.")}  # fmt: skip
    padd_name = "padd moe_ffn (triton)" if on_gpu() else "padd moe_ffn (reference)"
    impls = [(padd_name, padd_impl(p), "")] + [(name, *build(p)) for name, build in PEERS]
    for op, make_step, flops in (
        ("moe_ffn_fwd", _forward, p.flops),
        ("moe_ffn_fwd_bwd", _forward_backward, 3 * p.flops),
    ):
        records = []
        for name, fn, skip_reason in impls:
            if fn is None:
                print(f"skip {name}: {skip_reason}")
                continue
            record = _measure(op, name, make_step(fn, p), shape, flops)
            if record is not None:
                records.append(record)
        _print_speedups(records)
        _RECORDS.extend(records)
    if os.environ.get("PADD_BENCH_OUT"):  # after every shape: a run cut short keeps what it measured
        write_results(SUITE, _RECORDS)
