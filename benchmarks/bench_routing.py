"""Routing benchmark: padd `route` against its peers, side by side in one process.

    python -m pytest benchmarks/bench_routing.py -s          (PADD_BENCH_OUT=dir writes JSON)

Peers: torch eager (softmax + topk + renormalise + stable sort + bincount + cumsum + inverse),
the same with the top-k taken by a stable row sort ("ties to lower id": padd's tie rule, which
`topk` does not keep, so the one eager peer that computes padd's result on every input; CPU only),
torch.compile of the first, TransformerEngine's fused router and vLLM's fused_topk +
moe_align_block_size when importable (skipped with the reason printed otherwise).

Figure: effective GB/s over the bytes a fused router must move (read the logits; write weights,
ids, the full scores and the permutation metadata), and % of the HBM peak on a known GPU. On
CPU the rows are labelled CPU and the shapes are the embedded default's router (E = 8, top-2, at
T = 256 and 6400) plus the earlier 512 x 64 x 8 smoke shape; padd and torch eager run
interleaved in one loop (PADD_BENCH_CPU_REPS rounds, default 30) and padd's rows carry
`speedup_vs_eager` from that run. They are not GPU results.

Shape legend: T tokens, E experts, K = top_k, S = T·K slots.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from padd.kernels import route, routing_from_topk, routing_metadata

from benchmarks.common import (
    bench_device,
    cpu_reps,
    make_record,
    on_gpu,
    print_table,
    time_cuda_graph,
    time_fn,
    time_interleaved,
    write_results,
)

SUITE = "routing"
GPU_SHAPES = [(t, e, k) for t in (4096, 16384, 32768) for e in (64, 128, 256) for k in (4, 8)]
# CPU: the embedded default's router (E = 8, top-2) at a decode step of its 256 rollouts and at a
# training step's 64 sequences x ~100 tokens; then the earlier smoke shape.
CPU_SHAPES = [(256, 8, 2), (6400, 8, 2), (512, 64, 8)]
SHAPES = GPU_SHAPES if on_gpu() else CPU_SHAPES
LOGITS_DTYPE = torch.bfloat16 if on_gpu() else torch.float32
_RECORDS: list = []
EAGER_LOWER_ID = "torch eager (ties to lower id)"
_REPS = {"warmup": 3, "reps": 20} if on_gpu() else {"warmup": 3, "reps": cpu_reps(30)}
# The fwd+bwd and metadata tests take every third GPU shape, every CPU shape.
_SUBSET = slice(None, None, 3) if on_gpu() else slice(None)


def routing_bytes(num_tokens: int, num_experts: int, top_k: int, logits_dtype: torch.dtype) -> int:
    """Bytes a fused router moves: logits in; weights, ids, scores and int32 metadata out."""
    num_slots = num_tokens * top_k
    logits_in = num_tokens * num_experts * logits_dtype.itemsize
    topk_out = num_slots * (4 + 4)
    scores_out = num_tokens * num_experts * 4
    metadata_out = (num_experts + num_experts + 1 + 2 * num_slots) * 4
    return logits_in + topk_out + scores_out + metadata_out


def torch_eager_route(
    logits_TE: torch.Tensor, top_k: int, *, compile_friendly: bool = False, ties_to_lower_id: bool = False
):
    """What users write today: one kernel per step, scores materialised, metadata by sort.

    `ties_to_lower_id`: pick the top-k by a stable descending row sort instead of `topk`, whose
    order among equal scores is arbitrary: padd's tie rule, so the same result on every input."""
    num_experts = logits_TE.shape[1]
    scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    if ties_to_lower_id:
        # On the logits, as padd: softmax can round distinct logits to equal scores.
        key_TE = logits_TE.detach().float()
        experts_TK = torch.sort(key_TE, dim=-1, descending=True, stable=True)[1][:, :top_k]
        weights_TK = scores_TE.gather(1, experts_TK)
    else:
        weights_TK, experts_TK = torch.topk(scores_TE, top_k, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    flat_S = experts_TK.reshape(-1)
    sort_order_S = torch.argsort(flat_S, stable=True)
    if compile_friendly:
        # bincount's output size depends on the data, which breaks a compiled graph.
        counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat_S.device)
        counts_E = counts_E.index_add(0, flat_S, torch.ones_like(flat_S))
    else:
        counts_E = torch.bincount(flat_S, minlength=num_experts)
    offsets_E = torch.cumsum(counts_E, dim=0)
    inverse_S = torch.empty_like(sort_order_S)
    inverse_S[sort_order_S] = torch.arange(flat_S.numel(), device=flat_S.device)
    return (
        weights_TK,
        experts_TK.int(),
        scores_TE,
        counts_E.int(),
        offsets_E.int(),
        sort_order_S.int(),
        inverse_S.int(),
    )


# dynamic=True: one compile serves every T and E (a recompile per shape would dominate the run).
_compiled_eager = torch.compile(lambda x, k: torch_eager_route(x, k, compile_friendly=True), dynamic=True)


def _te_peer() -> tuple[Callable | None, str]:
    try:
        from transformer_engine.pytorch.router import fused_topk_with_score_function
    except Exception as exc:  # absent or broken install: a peer, never a requirement
        return None, f"TransformerEngine not importable ({type(exc).__name__}: {exc})"
    if not on_gpu():
        return None, "TransformerEngine's router needs CUDA"

    def run(logits_TE, top_k):
        return fused_topk_with_score_function(
            logits_TE, topk=top_k, use_pre_softmax=False, num_groups=None, group_topk=None,
            scaling_factor=None, score_function="softmax", expert_bias=None,
        )  # fmt: skip

    return run, ""


def _vllm_peer() -> tuple[Callable | None, str]:
    try:
        from vllm.model_executor.layers.fused_moe import fused_topk
        from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size
    except Exception as exc:
        return None, f"vLLM not importable ({type(exc).__name__}: {exc})"
    if not on_gpu():
        return None, "vLLM's fused_topk needs CUDA"

    def run(logits_TE, top_k):
        weights_TK, ids_TK = fused_topk(logits_TE, logits_TE, top_k, True)[:2]
        return moe_align_block_size(ids_TK, 64, logits_TE.shape[1])

    return run, ""


def _all_fields(r):
    """Read every field torch eager returns: on CPU `route` computes the metadata on first
    access, and a row that skipped it would not be the same work as its peers'."""
    _ = (r.tokens_per_expert, r.expert_offsets, r.sort_order, r.inverse_order)
    return r


def _impls() -> list[tuple[str, Callable | None, str]]:
    padd_name = "padd.route (triton)" if on_gpu() else "padd.route (reference)"
    padd = lambda x, k: _all_fields(route(x, k, return_scores=True))
    eager = lambda x, k: torch_eager_route(x, k)
    eager_lower_id = lambda x, k: torch_eager_route(x, k, ties_to_lower_id=True)
    # The same-result peer is timed on CPU, where padd's tie rule is what separates it from eager;
    # the GPU phase keeps the peers (and the time) its budget in run_gpu.sh was set for.
    lower_id = [] if on_gpu() else [(EAGER_LOWER_ID, eager_lower_id, "")]
    return [
        (padd_name, padd, ""),
        ("torch eager", eager, ""),
        *lower_id,
        ("torch.compile", _compiled_eager, ""),
    ] + [(name, *peer()) for name, peer in (("TransformerEngine", _te_peer), ("vLLM", _vllm_peer))]


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if _RECORDS:
        print_table(_RECORDS)
        if os.environ.get("PADD_BENCH_OUT"):
            print("results:", write_results(SUITE, _RECORDS))


@pytest.mark.parametrize("num_tokens,num_experts,top_k", SHAPES)
def test_bench_route_forward(num_tokens, num_experts, top_k):
    torch.manual_seed(0)
    logits_TE = torch.randn(num_tokens, num_experts, device=bench_device()).to(LOGITS_DTYPE)
    shape = {"T": num_tokens, "E": num_experts, "k": top_k, "dtype": str(LOGITS_DTYPE).removeprefix("torch.")}
    bytes_moved = routing_bytes(num_tokens, num_experts, top_k, LOGITS_DTYPE)
    reference = route(logits_TE, top_k, backend="reference")
    runs = {}
    for name, fn, skip_reason in _impls():
        if fn is None:
            print(f"skip {name}: {skip_reason}")
            continue
        if name.startswith("padd"):
            # No speed-up is reported for a kernel that disagrees with its reference.
            got = fn(logits_TE, top_k)
            assert torch.equal(got.sort_order, reference.sort_order), "padd routing disagrees"
            torch.testing.assert_close(got.weights, reference.weights, atol=1e-5, rtol=1e-4)
        if name == EAGER_LOWER_ID:  # the peer said to compute padd's result: checked, not assumed
            assert torch.equal(fn(logits_TE, top_k)[1].cpu(), reference.expert_ids.cpu()), name
        runs[name] = lambda fn=fn: fn(logits_TE, top_k)
    _measure_group("route_fwd", runs, shape, bytes_moved)


def _measure_group(op: str, runs: dict, shape: dict, bytes_moved: int) -> None:
    """Time `runs` (interleaved in one loop on CPU, so padd's ratio to torch eager comes from one
    run under one load) and record them; padd's row gets `speedup_vs_eager` and, where that peer
    ran, `speedup_vs_eager_lower_id`."""
    if on_gpu():
        timings = {}
        for name, run in runs.items():
            try:
                timings[name] = time_fn(run, **_REPS)
            except Exception as exc:
                timings[name] = exc
    else:
        timings = time_interleaved(runs, **_REPS)
    records = {}
    for name, timing in timings.items():
        if isinstance(timing, Exception):  # a peer whose API moved: report, do not fail the suite
            print(f"skip {name}: failed ({type(timing).__name__}: {timing})")
            continue
        cpu_ms = timing.pop("cpu_median_ms", None)
        records[name] = make_record(
            SUITE, op, name, shape, timing, bytes_moved=bytes_moved, cpu_median_ms=cpu_ms
        )
    padd = next((r for n, r in records.items() if n.startswith("padd")), None)
    eager = records.get("torch eager")
    if padd is not None and eager is not None:
        padd.extra["speedup_vs_eager"] = eager.median_ms / padd.median_ms
        if padd.extra.get("cpu_median_ms") and eager.extra.get("cpu_median_ms"):
            padd.extra["speedup_vs_eager_cpu_time"] = (
                eager.extra["cpu_median_ms"] / padd.extra["cpu_median_ms"]
            )
        print(f"  {op} {shape}: padd is {padd.extra['speedup_vs_eager']:.2f}x as fast as torch eager")
    lower_id = records.get(EAGER_LOWER_ID)
    if padd is not None and lower_id is not None:
        padd.extra["speedup_vs_eager_lower_id"] = lower_id.median_ms / padd.median_ms
        print(f"  {op} {shape}: {padd.extra['speedup_vs_eager_lower_id']:.2f}x as fast as {EAGER_LOWER_ID}")
    _RECORDS.extend(records.values())


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("num_tokens,num_experts,top_k", SHAPES)
def test_bench_route_forward_device_time(num_tokens, num_experts, top_k):
    """The same work replayed from a CUDA graph: device time, with Python's launch cost removed
    (what a compiled or graph-captured model pays). Eager uses the sync-free histogram."""
    torch.manual_seed(0)
    logits_TE = torch.randn(num_tokens, num_experts, device=bench_device()).to(LOGITS_DTYPE)
    shape = {"T": num_tokens, "E": num_experts, "k": top_k, "dtype": str(LOGITS_DTYPE).removeprefix("torch.")}
    bytes_moved = routing_bytes(num_tokens, num_experts, top_k, LOGITS_DTYPE)
    impls = (
        ("padd.route (triton)", lambda: route(logits_TE, top_k, return_scores=True)),
        ("torch eager", lambda: torch_eager_route(logits_TE, top_k, compile_friendly=True)),
    )
    for name, fn in impls:
        try:
            timing = time_cuda_graph(fn)
        except Exception as exc:
            print(f"skip {name} (CUDA graph): failed ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        _RECORDS.append(make_record(SUITE, "route_fwd_graph", name, shape, timing, bytes_moved=bytes_moved))


@pytest.mark.parametrize("num_tokens,num_experts,top_k", SHAPES[_SUBSET])
def test_bench_route_forward_backward(num_tokens, num_experts, top_k):
    torch.manual_seed(0)
    dev = bench_device()
    logits_TE = torch.randn(num_tokens, num_experts, device=dev).to(LOGITS_DTYPE).requires_grad_()
    grad_w_TK = torch.randn(num_tokens, top_k, device=dev)
    grad_s_TE = torch.randn(num_tokens, num_experts, device=dev)
    shape = {"T": num_tokens, "E": num_experts, "k": top_k, "dtype": str(LOGITS_DTYPE).removeprefix("torch.")}
    # Backward adds: read the two upstream gradients and the logits again, write d logits.
    bytes_moved = routing_bytes(num_tokens, num_experts, top_k, LOGITS_DTYPE) + num_tokens * (
        num_experts * (4 + 2 * LOGITS_DTYPE.itemsize) + top_k * 8
    )

    def padd_step():
        r = _all_fields(route(logits_TE, top_k, return_scores=True))
        torch.autograd.backward([r.weights, r.scores], [grad_w_TK, grad_s_TE])

    def eager_step(ties_to_lower_id: bool = False):
        weights_TK, _, scores_TE, *_ = torch_eager_route(logits_TE, top_k, ties_to_lower_id=ties_to_lower_id)
        torch.autograd.backward([weights_TK, scores_TE], [grad_w_TK, grad_s_TE])

    padd_name = "padd.route (triton)" if on_gpu() else "padd.route (reference)"
    runs = {padd_name: padd_step, "torch eager": eager_step}
    if not on_gpu():  # (as in `_impls`)
        runs[EAGER_LOWER_ID] = lambda: eager_step(True)
    _measure_group("route_fwd_bwd", runs, shape, bytes_moved)


@pytest.mark.parametrize("num_tokens,num_experts,top_k", SHAPES[_SUBSET])
def test_bench_metadata_from_topk(num_tokens, num_experts, top_k):
    """Metadata of decisions made elsewhere (the transformers path): `routing_from_topk`."""
    torch.manual_seed(0)
    dev = bench_device()
    experts_TK = torch.rand(num_tokens, num_experts, device=dev).argsort(dim=-1)[:, :top_k]  # int64, as HF
    weights_TK = torch.rand(num_tokens, top_k, device=dev)
    shape = {"T": num_tokens, "E": num_experts, "k": top_k}
    num_slots = num_tokens * top_k
    bytes_moved = num_slots * 8 + (2 * num_slots + 2 * num_experts + 1) * 4
    padd_name = "padd (triton)" if on_gpu() else "padd (reference)"
    impls = (
        (padd_name, lambda: routing_from_topk(experts_TK, weights_TK, num_experts)),
        ("torch eager", lambda: routing_metadata(experts_TK, num_experts)),
    )
    _measure_group("metadata", dict(impls), shape, bytes_moved)
