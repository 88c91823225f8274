"""MoE expert FFN benchmark: padd `moe_ffn` against its peers, side by side in one process.

    python -m pytest benchmarks/bench_moe_ffn.py -s          (PADD_BENCH_OUT=dir writes JSON)

Peers: the transformers eager loop (`experts_implementation="eager"`), transformers
`grouped_mm` (torch grouped GEMM) and `batched_mm` (one bmm per slot over gathered weights, meant
for decode), MegaBlocks' dMoE (block-sparse `sparse` and `grouped` MLPs) and Liger's fused MoE
when importable (skipped with the reason printed and written to the JSON otherwise). All but
MegaBlocks use the same HF-layout weights and the same top-k decisions; padd's timing includes
building its routing metadata (`routing_from_topk`), as transformers' implementations sort
inside their forward. MegaBlocks brings its own router and weights, so its time also includes a
(tiny) router GEMM and top-k, and its fwd+bwd includes its router's gradient.

"What users have" is transformers' best: every padd row gets `speedup_vs_best_transformers`
(the faster of grouped_mm and batched_mm over padd, which one in `best_transformers`) and
`speedup_vs_best_peer` over every peer measured beside it.

Figures: TFLOP/s over the useful expert FLOPs (forward 2·T·k·H·3I, forward+backward three times
that), % of the GPU's bf16 peak, peak memory, and padd's speed-up over each peer. On CPU the rows
are labelled CPU, the first model is the embedded default's student (H 128, E 8 of width 256,
top-2; T = 256 is one decode step of its 256 rollouts), and every implementation of a shape runs
interleaved in one loop (PADD_BENCH_CPU_REPS rounds, default 10), so padd's
`speedup_vs_best_transformers` comes from one run under one load. They are not GPU results.

Environment (all optional):
  PADD_BENCH_TOKENS="1,8,64"        token counts T (GPU default 1,8,64,512,4096,32768: decode to
                                    training; CPU default 1,8,256)
  PADD_BENCH_MODELS="olmoe-1b-7b"   model names from MODELS (GPU) or CPU_MODELS; default: all of
                                    the device's list
  PADD_BENCH_PEERS="grouped_mm,batched_mm"  peer keys from PEERS (default: all); padd always runs.
                                    With only unavailable peers selected, each shape is skipped
                                    without timing padd.
  PADD_BENCH_TAG=decode             suffix of the JSON file name (see common.write_results)
  PADD_MEGABLOCKS_BUILD_LOG=path    when MegaBlocks does not import, the tail of this build log
                                    goes into the skip reason (benchmarks/run_gpu.sh sets it)
Shapes run T-major (every model at the first T, then the next T), and the JSON is rewritten after
every measurement, so a run cut short by a time limit keeps everything it measured.

Shape legend: T tokens, H hidden, I expert width, E experts, k top_k.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from padd.kernels import moe_ffn, moe_ffn_reference, routing_from_topk
from padd.kernels.grouped_gemm import moe_ffn_flops

from benchmarks.common import (
    bench_device,
    cpu_reps,
    env_list,
    make_record,
    on_gpu,
    peak_memory_mb,
    report_suite,
    time_fn,
    time_interleaved,
    write_if_requested,
)

SUITE = "moe_ffn"
# (name, H, I, E, k) of each model's routed experts: hidden size, expert width
# (moe_intermediate_size), routed experts, experts per token. From the project's kernel anchors
# (see benchmarks/README.md)
# section 2 and the models' config.json.
MODELS = [
    ("mixtral-8x7b", 4096, 14336, 8, 2),
    ("qwen3-30b-a3b", 2048, 768, 128, 8),
    ("olmoe-1b-7b", 2048, 1024, 64, 8),
    # DeepSeek-V2-Lite: 64 routed experts (top-6, width 1408) plus 2 shared experts in every MoE
    # layer. Only the routed part is benchmarked here: the shared experts are a dense SwiGLU
    # (width 2·1408) that every token runs, the same dense GEMMs whatever runs the routed part.
    ("deepseek-v2-lite", 2048, 1408, 64, 6),
    ("anchor-30b", 4096, 1024, 64, 4),  # the 30B anchor: hidden 4096, width 1024, 64 experts, top-4
]
# CPU: the embedded default's student (hidden 128, 8 experts of width 256, top-2), then the earlier
# smoke models.
CPU_MODELS = [
    ("padd-default", 128, 256, 8, 2),
    ("tiny-cpu", 128, 64, 8, 2),
    ("tiny-cpu-many-experts", 64, 32, 32, 4),
]
GPU_TOKENS = "1,8,64,512,4096,32768"  # 1-64: decode batches; 512+: prefill and training
CPU_TOKENS = "1,8,256"


def _shapes() -> list[tuple]:
    known = {m[0]: m for m in MODELS + CPU_MODELS}
    default = MODELS if on_gpu() else CPU_MODELS
    names = env_list("PADD_BENCH_MODELS", ",".join(m[0] for m in default))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"PADD_BENCH_MODELS: unknown {unknown}; known: {sorted(known)}")
    tokens = [int(t) for t in env_list("PADD_BENCH_TOKENS", GPU_TOKENS if on_gpu() else CPU_TOKENS)]
    return [(n, t, *known[n][1:]) for t in tokens for n in names]


SHAPES = _shapes()
DTYPE = torch.bfloat16 if on_gpu() else torch.float32
_REPS = {"warmup": 2, "reps": 5} if on_gpu() else {"warmup": 2, "reps": cpu_reps(10)}
_RECORDS: list = []
_SKIPPED: list[dict] = []  # peers not measured, with the reason (written to the JSON)
_WEIGHTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # one model's weights, reused across T


def _weights(num_experts: int, inter: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-layout expert weights (gate_up_proj [E, 2I, H], down_proj [E, H, I]), drawn on the device
    once per model (Mixtral's 2.8 GB would otherwise be regenerated for every T)."""
    key = (num_experts, inter, hidden)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        if on_gpu():
            torch.cuda.empty_cache()
        device = bench_device()
        gen = torch.Generator(device=device).manual_seed(0)
        w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device, dtype=DTYPE)
        w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=device, dtype=DTYPE)
        _WEIGHTS[key] = (w13.mul_(hidden**-0.5), w2.mul_(inter**-0.5))
    return _WEIGHTS[key]


class Problem:
    """One benchmark problem: activations, HF-layout weights and top-k decisions."""

    def __init__(self, num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int):
        device = bench_device()
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.x_TH = torch.randn(num_tokens, hidden, generator=gen).to(device, DTYPE)
        self.w13_E2IH, self.w2_EHI = _weights(num_experts, inter, hidden)
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


@dataclass
class Impl:
    """A runnable implementation: `fn(x, w13, w2, weights) -> out [T, H]`, or why there is none."""

    name: str
    fn: Callable | None = None
    reason: str = ""
    # Parameters of its own (MegaBlocks' router and experts) whose gradients fwd+bwd must compute.
    extra_params: list[torch.Tensor] = field(default_factory=list)
    # op -> reason not to run it at this shape ("" to run), e.g. a memory estimate.
    refuse: Callable[[str], str] = lambda op: ""


def padd_impl(p: Problem) -> Impl:
    def run(x, w13, w2, weights):
        return moe_ffn(x, w13, w2, routing_from_topk(p.experts_TK, weights, w13.shape[0]))

    return Impl("padd moe_ffn (triton)" if on_gpu() else "padd moe_ffn (reference)", run)


def _hf_experts(p: Problem, implementation: str) -> Callable:
    from transformers import Qwen3MoeConfig
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    if implementation != "eager" and implementation not in ALL_EXPERTS_FUNCTIONS:
        raise KeyError(f"not in this transformers' experts registry ({sorted(ALL_EXPERTS_FUNCTIONS)})")
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


def _batched_mm_refuse(p: Problem) -> Callable[[str], str]:
    """batched_mm gathers one copy of an expert's weights per slot (T·k of them): refuse shapes
    whose gathered copies (and, for fwd+bwd, their gradients) would not fit in 70% of free memory."""

    def refuse(op: str) -> str:
        if not on_gpu():
            return ""
        num_slots = p.experts_TK.numel()
        gathered = num_slots * (p.w13_E2IH[0].numel() + p.w2_EHI[0].numel()) * DTYPE.itemsize
        need = gathered * (2 if op.endswith("bwd") else 1)
        free, _ = torch.cuda.mem_get_info()
        if need > 0.7 * free:
            return (
                f"batched_mm gathers {num_slots} expert weight copies: ~{need / 2**30:.0f} GiB "
                f"> 70% of the {free / 2**30:.0f} GiB free"
            )
        return ""

    return refuse


def hf_impl(implementation: str) -> Callable[[Problem], Impl]:
    name = f"transformers {implementation}"

    def build(p: Problem) -> Impl:
        try:
            fn = _hf_experts(p, implementation)
        except Exception as exc:
            return Impl(name, reason=f"transformers experts unavailable ({type(exc).__name__}: {exc})")
        if implementation == "batched_mm":
            return Impl(name, fn, refuse=_batched_mm_refuse(p))
        return Impl(name, fn)

    return build


def liger_impl(p: Problem) -> Impl:
    name = "Liger fused MoE"
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception as exc:
        return Impl(name, reason=f"Liger fused MoE not importable ({type(exc).__name__}: {exc})")
    if not on_gpu():
        return Impl(name, reason="Liger's fused MoE needs CUDA")

    def run(x, w13, w2, weights):
        return LigerFusedMoEFunction.apply(x, w13, w2, p.experts_TK, weights.to(x.dtype))

    return Impl(name, run)


def _build_log_tail(chars: int = 1500) -> str:
    """The end of MegaBlocks' build log (run_gpu.sh builds it from .whl/ in the background)."""
    status = os.environ.get("PADD_MEGABLOCKS_STATUS", "")
    path = os.environ.get("PADD_MEGABLOCKS_BUILD_LOG")
    if path and os.path.exists(path):
        with open(path, errors="replace") as f:
            status += f" | build log {path} ends: {f.read()[-chars:]}"
    return status


def megablocks_impl(mlp_impl: str) -> Callable[[Problem], Impl]:
    """MegaBlocks' dMoE with its block-sparse (stk) or grouped (grouped_gemm) expert MLP."""
    name = f"MegaBlocks dMoE ({mlp_impl})"

    def build(p: Problem) -> Impl:
        try:
            from megablocks.layers.arguments import Arguments
            from megablocks.layers.dmoe import dMoE
        except Exception as exc:
            reason = f"MegaBlocks not importable ({type(exc).__name__}: {exc})"
            return Impl(name, reason=(reason + " " + _build_log_tail()).strip())
        if not on_gpu():
            return Impl(name, reason="MegaBlocks needs CUDA")
        num_experts, two_inter, hidden = p.w13_E2IH.shape
        try:
            args = Arguments(
                hidden_size=hidden, ffn_hidden_size=two_inter // 2, moe_num_experts=num_experts,
                moe_top_k=p.experts_TK.shape[1], mlp_type="glu", mlp_impl=mlp_impl, activation_fn=F.silu,
                bias=False, return_bias=False, moe_loss_weight=0.0, bf16=DTYPE == torch.bfloat16,
                fp16=False, device=torch.cuda.current_device(),
            )  # fmt: skip
            layer = dMoE(args)
        except Exception as exc:
            return Impl(name, reason=f"MegaBlocks dMoE could not be built ({type(exc).__name__}: {exc})")

        def run(x, w13, w2, weights):
            # dMoE routes by itself: its own router picks the experts, the weights are its own.
            out = layer(x.view(x.shape[0], 1, -1))
            out = out[0] if isinstance(out, tuple) else out
            return out.view(x.shape[0], -1)

        return Impl(name, run, extra_params=[t for t in layer.parameters() if t.requires_grad])

    return build


# key (for PADD_BENCH_PEERS) -> builder. Order is run order: the peers that matter most first.
PEERS: dict[str, Callable[[Problem], Impl]] = {
    "grouped_mm": hf_impl("grouped_mm"),
    "batched_mm": hf_impl("batched_mm"),
    "liger": liger_impl,
    "eager": hf_impl("eager"),
    "megablocks_sparse": megablocks_impl("sparse"),
    "megablocks_grouped": megablocks_impl("grouped"),
}
_PEER_KEYS = env_list("PADD_BENCH_PEERS", ",".join(PEERS))
if unknown := [k for k in _PEER_KEYS if k not in PEERS]:
    raise ValueError(f"PADD_BENCH_PEERS: unknown {unknown}; known: {list(PEERS)}")
_TRANSFORMERS = ("transformers grouped_mm", "transformers batched_mm")


def _forward(impl: Impl, p: Problem) -> Callable[[], object]:
    inputs = [t.detach() for t in (p.x_TH, p.w13_E2IH, p.w2_EHI, p.weights_TK)]

    def step():
        with torch.no_grad():
            return impl.fn(*inputs)

    return step


def _forward_backward(impl: Impl, p: Problem) -> Callable[[], object]:
    leaves = p.leaves()
    params = leaves + impl.extra_params

    def step():
        out = impl.fn(*leaves)
        return torch.autograd.grad(out, params, p.grad_TH, allow_unused=True)

    return step


def _check_padd(p: Problem) -> None:
    """No speed-up is reported for a kernel that disagrees with its reference."""
    routing = routing_from_topk(p.experts_TK, p.weights_TK, p.w13_E2IH.shape[0])
    got = moe_ffn(p.x_TH, p.w13_E2IH, p.w2_EHI, routing).float()
    want = moe_ffn_reference(p.x_TH, p.w13_E2IH, p.w2_EHI, routing).float()
    rel_rms = ((got - want).square().mean() / want.square().mean().clamp_min(1e-30)).sqrt().item()
    assert rel_rms < 2e-2, f"padd moe_ffn disagrees with its reference (relative RMS {rel_rms:.3g})"


def _skip(name: str, reason: str, shape: dict, op: str | None = None) -> None:
    """Print and keep (for the JSON) why `name` was not measured; one entry per (impl, op, reason)."""
    where = f"{shape['model']} T={shape['T']}"
    print(f"skip {name}{' ' + op if op else ''} {where}: {reason}")
    for entry in _SKIPPED:
        if (entry["impl"], entry["op"], entry["reason"]) == (name, op, reason):
            entry["shapes"].append(where)
            return
    _SKIPPED.append({"impl": name, "op": op, "reason": reason, "shapes": [where]})


def _measure(op: str, impl: Impl, step: Callable, shape: dict, flops: int):
    try:
        timing = time_fn(step, **_REPS)
        mem = peak_memory_mb(step)
    except Exception as exc:  # a peer whose API moved or ran out of memory: report, do not fail
        _skip(impl.name, f"failed ({type(exc).__name__}: {str(exc)[:300]})", shape, op)
        return None
    finally:
        if on_gpu():
            torch.cuda.empty_cache()
    return make_record(SUITE, op, impl.name, shape, timing, flops=flops, peak_mem_mb=mem)


def _measure_cpu_group(op: str, impls: list, p: Problem, make_step: Callable, shape: dict, flops: int):
    """CPU: every implementation timed in one interleaved loop (common.time_interleaved)."""
    steps = {impl.name: make_step(impl, p) for impl in impls}
    records = []
    for name, timing in time_interleaved(steps, **_REPS).items():
        if isinstance(timing, Exception):
            _skip(name, f"failed ({type(timing).__name__}: {str(timing)[:300]})", shape, op)
            continue
        cpu_ms = timing.pop("cpu_median_ms", None)
        records.append(make_record(SUITE, op, name, shape, timing, flops=flops, cpu_median_ms=cpu_ms))
    return records


def _speedups(records: list) -> None:
    """padd's speed-up over each peer, over transformers' best (grouped_mm or batched_mm, whichever
    is faster at this shape) and over the best peer of all."""
    padd = next((r for r in records if r.impl.startswith("padd")), None)
    if padd is None:
        return
    peers = [r for r in records if r is not padd]
    for r in peers:
        r.extra["padd_speedup"] = r.median_ms / padd.median_ms
        if r.impl == "transformers eager":
            padd.extra["speedup_vs_eager"] = r.median_ms / padd.median_ms
    where = f"{padd.op} {padd.shape['model']} T={padd.shape['T']}"
    for key, group in (("transformers", [r for r in peers if r.impl in _TRANSFORMERS]), ("peer", peers)):
        if group:
            best = min(group, key=lambda r: r.median_ms)
            padd.extra[f"best_{key}"] = best.impl
            padd.extra[f"speedup_vs_best_{key}"] = best.median_ms / padd.median_ms
            print(f"  {where}: padd is {best.median_ms / padd.median_ms:.2f}x the best {key} ({best.impl})")


def _write() -> None:
    write_if_requested(SUITE, _RECORDS, {"skipped": _SKIPPED})


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    report_suite(SUITE, _RECORDS, _SKIPPED)


@pytest.mark.parametrize("model,num_tokens,hidden,inter,num_experts,top_k", SHAPES)
def test_bench_moe_ffn(model, num_tokens, hidden, inter, num_experts, top_k):
    p = Problem(num_tokens, hidden, inter, num_experts, top_k)
    shape = {"model": model, "T": num_tokens, "H": hidden, "I": inter, "E": num_experts, "k": top_k,
             "dtype": str(DTYPE).removeprefix("torch.")}  # fmt: skip
    peers = [PEERS[key](p) for key in _PEER_KEYS]
    for impl in peers:
        if impl.fn is None:
            _skip(impl.name, impl.reason, shape)
    if peers and all(impl.fn is None for impl in peers):
        _write()
        pytest.skip("no selected peer is available: " + "; ".join(impl.reason[:200] for impl in peers))
    _check_padd(p)
    impls = [padd_impl(p)] + [impl for impl in peers if impl.fn is not None]
    for op, make_step, flops in (
        ("moe_ffn_fwd", _forward, p.flops),
        ("moe_ffn_fwd_bwd", _forward_backward, 3 * p.flops),
    ):
        records = []
        if not on_gpu():  # CPU: one interleaved loop, so every ratio comes from the same load
            records = _measure_cpu_group(op, impls, p, make_step, shape, flops)
            _RECORDS.extend(records)
            _write()
        for impl in impls if on_gpu() else ():
            if reason := impl.refuse(op):
                _skip(impl.name, reason, shape, op)
                continue
            record = _measure(op, impl, make_step(impl, p), shape, flops)
            if record is not None:
                records.append(record)
                _RECORDS.append(record)
                _write()  # after every measurement: a run cut short keeps what it measured
        _speedups(records)
    _write()
