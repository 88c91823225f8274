"""moe_ffn: Triton kernels (interpreter on CPU) vs the reference, the reference vs a dense loop.

Shape legend: T tokens, H hidden, I expert width, E experts, K top_k.
"""

from __future__ import annotations

import pytest
import torch
from padd.kernels import Routing, moe_ffn, moe_ffn_reference, route, routing_from_topk
from padd.kernels.grouped_gemm import moe_ffn_flops
from padd.kernels.grouped_gemm import triton as moe_triton
from padd.kernels.grouped_gemm.reference import moe_ffn_reference_backward, moe_ffn_reference_forward
from torch.utils.flop_counter import FlopCounterMode

TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-2, "rtol": 2e-2},
    torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2},
}

# (T, H, I, E, K, load): odd/even H, T below one tile and across tiles, k = 1, 2 and E.
# load "one" sends every token to one expert; "sparse" leaves most experts empty.
CASES = [
    (1, 24, 16, 1, 1, "random"),
    (5, 40, 24, 4, 2, "random"),
    (33, 24, 16, 7, 2, "random"),
    (5, 24, 24, 7, 7, "random"),
    (33, 40, 16, 4, 4, "random"),
    (1, 40, 24, 7, 1, "random"),
    (33, 24, 24, 4, 1, "one"),
    (33, 40, 16, 7, 2, "sparse"),
]


def _experts(num_tokens: int, num_experts: int, top_k: int, load: str) -> torch.Tensor:
    if load == "one":
        return torch.full((num_tokens, 1), num_experts - 1, dtype=torch.int64)
    pool = torch.arange(num_experts) if load == "random" else torch.tensor([1, num_experts - 2])
    scores = torch.rand(num_tokens, pool.numel())
    return pool[scores.topk(min(top_k, pool.numel()), dim=1).indices]


def make_inputs(T, H, I, E, K, load="random", dtype=torch.float32, device=None):
    """Random x, HF-layout weights and a Routing (weights sum to 1 per token)."""
    x = torch.randn(T, H)
    w13 = torch.randn(E, 2 * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    experts_TK = _experts(T, E, K, load)
    weights_TK = torch.rand(experts_TK.shape).softmax(dim=1)
    routing = routing_from_topk(experts_TK.to(device), weights_TK.to(device), E)
    return x.to(device, dtype), w13.to(device, dtype), w2.to(device, dtype), routing


def dense_loop(x, w13, w2, experts_TK, weights_TK):
    """Independent oracle in fp64: every token through each of its experts, one at a time."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(experts_TK.shape[1]):
            e = int(experts_TK[t, j])
            gate_up = w13[e].double() @ x[t].double()
            h = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += float(weights_TK[t, j]) * (w2[e].double() @ h)
    return out


def fwd_bwd(x, w13, w2, routing, backend, grad):
    """Output and (dx, d gate_up, d down, d weights) for an upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w13, w2, routing.weights)]
    r = Routing(**{**routing.__dict__, "weights": leaves[3]})
    out = moe_ffn(*leaves[:3], r, backend=backend)
    return out, torch.autograd.grad(out, leaves, grad)


def assert_matches(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("case", CASES[:5] + CASES[6:])
def test_reference_matches_dense_loop(case):
    x, w13, w2, r = make_inputs(*case)
    want = dense_loop(x, w13, w2, r.expert_ids, r.weights)
    torch.testing.assert_close(moe_ffn_reference(x, w13, w2, r).double(), want, atol=1e-5, rtol=1e-5)


def test_cpu_inference_skips_the_op_with_the_same_output_and_flops():
    """Under no_grad on CPU `moe_ffn` calls the reference directly: same bits as the op, same FLOPs."""
    x, w13, w2, r = make_inputs(33, 24, 16, 7, 2, "sparse")
    through_op = moe_ffn(x.clone().requires_grad_(), w13, w2, r).detach()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        direct = moe_ffn(x, w13, w2, r)
    assert torch.equal(direct, through_op)
    assert counter.get_total_flops() == moe_ffn_flops(33, 2, 24, 16)
    assert "padd" not in {str(op).split(".")[0] for op in counter.get_flop_counts()["Global"]}


def test_reference_backward_recomputes_when_no_cache():
    x, w13, w2, r = make_inputs(33, 24, 16, 7, 2, "skewed")
    grad = torch.randn_like(x)
    _, cache = moe_ffn_reference_forward(x, w13, w2, r)
    with_cache = moe_ffn_reference_backward(grad, x, w13, w2, r, cache)
    recomputed = moe_ffn_reference_backward(grad, x, w13, w2, r, None)
    for a, b in zip(with_cache, recomputed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    skipped = moe_ffn_reference_backward(grad, x, w13, w2, r, cache, needs=(False, True, False))
    assert skipped[0] is None and skipped[2] is None
    torch.testing.assert_close(skipped[1], with_cache[1], atol=0, rtol=0)


@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[7]])
def test_cpu_op_backward_matches_reference_autograd(case):
    """The custom op's hand-written CPU backward against autograd through the reference."""
    x, w13, w2, r = make_inputs(*case)
    grad = torch.randn_like(x)
    out, grads = fwd_bwd(x, w13, w2, r, "auto", grad)
    out_ref, grads_ref = fwd_bwd(x, w13, w2, r, "reference", grad)
    assert_matches(out, out_ref, torch.float32)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_matches(g, g_ref, torch.float32)


def test_cpu_backward_keeps_its_tensors_through_saved_tensor_hooks():
    """Every tensor the eager CPU backward reuses (the sorted x rows included) goes through
    save_for_backward: an offloading hook that hands back copies gives the same gradients."""
    x, w13, w2, r = make_inputs(33, 24, 16, 7, 2, "skewed")
    grad = torch.randn_like(x)
    _, grads_plain = fwd_bwd(x, w13, w2, r, "auto", grad)
    packed: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t):
        packed.append((tuple(t.shape), t.dtype))
        return t.detach().clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, grads_hooked = fwd_bwd(x, w13, w2, r, "auto", grad)
    num_slots, num_experts = r.expert_ids.numel(), r.num_experts
    assert ((num_slots, x.shape[1]), x.dtype) in packed  # the sorted x rows [S, H]
    # The routing's index tensors too: sort and inverse order [S], offsets [E + 1] (int32).
    assert ((num_slots,), torch.int32) in packed and ((num_experts + 1,), torch.int32) in packed
    for g, g_ref in zip(grads_hooked, grads_plain, strict=True):
        torch.testing.assert_close(g, g_ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case, dtype):
    x, w13, w2, r = make_inputs(*case, dtype=dtype)
    grad = torch.randn_like(x)
    out, grads = fwd_bwd(x, w13, w2, r, "triton", grad)
    out_ref, grads_ref = fwd_bwd(x, w13, w2, r, "reference", grad)
    assert out.dtype == dtype and out.shape == x.shape
    assert_matches(out, out_ref, dtype)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == g_ref.dtype
        assert_matches(g, g_ref, dtype)


def test_triton_is_deterministic():
    x, w13, w2, r = make_inputs(33, 24, 16, 7, 2)
    grad = torch.randn_like(x)
    first, second = (fwd_bwd(x, w13, w2, r, "triton", grad) for _ in range(2))
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


def test_triton_writes_every_element(monkeypatch):
    """Kernel buffers prefilled with NaN: any element a kernel forgets to write shows up."""
    nan_empty = lambda *shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype)
    monkeypatch.setattr(moe_triton, "_empty", nan_empty)
    x, w13, w2, r = make_inputs(33, 24, 16, 7, 2, "sparse")
    out, grads = fwd_bwd(x, w13, w2, r, "triton", torch.randn_like(x))
    for t in (out, *grads):
        assert torch.isfinite(t).all()
    _, grads_ref = fwd_bwd(x, w13, w2, r, "reference", torch.ones_like(x))
    assert grads_ref[1].abs().sum() > 0


def test_triton_entry_point_with_routed_logits():
    """Forced Triton on a Routing from `route` rather than `routing_from_topk`."""
    x, w13, w2, _ = make_inputs(5, 24, 16, 4, 2)
    r = route(torch.randn(5, 4), 2, backend="reference")
    assert_matches(moe_ffn(x, w13, w2, r, backend="triton"), moe_ffn_reference(x, w13, w2, r), torch.float32)


def test_autocast_computes_in_autocast_dtype():
    x, w13, w2, r = make_inputs(5, 24, 16, 4, 2)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe_ffn(x, w13, w2, r)
    assert out.dtype == torch.bfloat16
    want = moe_ffn_reference(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), r)
    assert_matches(out, want, torch.bfloat16)
    (dx,) = torch.autograd.grad(out.float().sum(), x)
    assert dx.dtype == torch.float32


def test_empty_batch():
    x, w13, w2, r = make_inputs(0, 24, 16, 4, 2)
    for backend in ("auto", "triton", "reference"):
        assert moe_ffn(x, w13, w2, r, backend=backend).shape == (0, 24)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_flop_counter(backend):
    T, H, I, E, K = 5, 24, 16, 4, 2
    forward = 2 * T * K * H * 3 * I
    x, w13, w2, r = make_inputs(T, H, I, E, K)
    with FlopCounterMode(display=False) as forward_only:
        moe_ffn(x, w13, w2, r, backend=backend)
    assert forward_only.get_total_flops() == forward == moe_ffn_flops(T, K, H, I)
    with FlopCounterMode(display=False) as both:
        fwd_bwd(x, w13, w2, r, backend, torch.randn_like(x))
    assert both.get_total_flops() == 3 * forward
    # Frozen weights: the backward is dh = dy·W2 and dx only, 2·T·K·H·3I.
    x.requires_grad_()
    with FlopCounterMode(display=False) as frozen:
        moe_ffn(x, w13, w2, r, backend=backend).backward(torch.randn_like(x))
    assert frozen.get_total_flops() == 2 * forward


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_backward_with_frozen_weights(backend):
    """Only x needs a gradient: the weight-gradient kernels are skipped, dx still matches."""
    x, w13, w2, r = make_inputs(33, 24, 16, 7, 2)
    grad = torch.randn_like(x)
    _, (dx_want, *_) = fwd_bwd(x, w13, w2, r, "reference", grad)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(moe_ffn(x, w13, w2, r, backend=backend), x, grad)
    assert_matches(dx, dx_want, torch.float32)


def test_torch_compile_fullgraph_cpu():
    x, w13, w2, r = make_inputs(9, 24, 16, 4, 2)
    grad = torch.randn_like(x)

    def layer(x, w13, w2, routing):
        return moe_ffn(x * 2.0, w13, w2, routing).tanh()

    compiled = torch.compile(layer, fullgraph=True)
    results = []
    # The AOT-autograd cache keys on the forward graph only: a cached backward could outlive a
    # change of the backward op's schema, so it is bypassed here (inductor's own cache stays on).
    with torch._functorch.config.patch(enable_autograd_cache=False):
        for fn in (layer, compiled):
            leaves = [t.clone().requires_grad_() for t in (x, w13, w2)]
            out = fn(*leaves, r)
            results.append((out, torch.autograd.grad(out, leaves, grad)))
    assert_matches(results[1][0], results[0][0], torch.float32)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        assert_matches(a, b, torch.float32)


def _bad_inputs():
    x, w13, w2, r = make_inputs(5, 24, 16, 4, 2)
    r_other_e = make_inputs(5, 24, 16, 3, 2)[3]
    r_other_t = make_inputs(6, 24, 16, 4, 2)[3]
    r_bad_w = Routing(**{**r.__dict__, "weights": r.weights[:, :1]})
    r_int_w = Routing(**{**r.__dict__, "weights": r.expert_ids})
    return {
        "x rank": (ValueError, (x[None], w13, w2, r)),
        "x hidden": (ValueError, (x[:, :20], w13, w2, r)),
        "w13 rank": (ValueError, (x, w13[0], w2, r)),
        "w13 odd": (ValueError, (x, w13[:, :31], w2, r)),
        "w2 shape": (ValueError, (x, w13, w2[:, :, :8], r)),
        "w2 experts": (ValueError, (x, w13, w2[:3], r)),
        "x dtype": (TypeError, (x.double(), w13, w2, r)),
        "mixed dtype": (TypeError, (x.half(), w13, w2, r)),
        "int x": (TypeError, (x.long(), w13.long(), w2.long(), r)),
        "not a tensor": (TypeError, (x.tolist(), w13, w2, r)),
        "not a routing": (TypeError, (x, w13, w2, r.expert_ids)),
        "routing experts": (ValueError, (x, w13, w2, r_other_e)),
        "routing tokens": (ValueError, (x, w13, w2, r_other_t)),
        "routing weights shape": (ValueError, (x, w13, w2, r_bad_w)),
        "routing weights dtype": (TypeError, (x, w13, w2, r_int_w)),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_input_errors(name):
    error, args = _bad_inputs()[name]
    with pytest.raises(error):
        moe_ffn(*args)


def test_unknown_backend():
    with pytest.raises(ValueError):
        moe_ffn(*make_inputs(2, 24, 16, 4, 2), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_triton_bf16_gpu(case):
    x, w13, w2, r = make_inputs(*case, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn_like(x)
    out, grads = fwd_bwd(x, w13, w2, r, "auto", grad)
    out_ref, grads_ref = fwd_bwd(x, w13, w2, r, "reference", grad)
    assert_matches(out, out_ref, torch.bfloat16)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_matches(g, g_ref, torch.bfloat16)


@pytest.mark.gpu
def test_triton_int64_offsets_gpu():
    """T·K·H > 2**31: slot-row offsets into the [S, H] buffers overflow int32."""
    T, H, I, E, K = 65_600, 4096, 32, 8, 8
    assert T * K * H > 2**31
    x, w13, w2, r = make_inputs(T, H, I, E, K, dtype=torch.bfloat16, device="cuda")
    out = moe_ffn(x, w13, w2, r)
    rows = torch.tensor([0, T // 2, T - 1], device="cuda")
    sub_x = x[rows]
    sub_r = routing_from_topk(r.expert_ids[rows], r.weights[rows], E)
    assert_matches(out[rows], moe_ffn_reference(sub_x, w13, w2, sub_r), torch.bfloat16)
    grad = torch.zeros_like(x)
    grad[-1] = 1.0
    x.requires_grad_()
    (dx,) = torch.autograd.grad(moe_ffn(x, w13, w2, r), x, grad)
    sub_x.requires_grad_()
    (dx_ref,) = torch.autograd.grad(moe_ffn_reference(sub_x, w13, w2, sub_r), sub_x, grad[rows])
    assert_matches(dx[rows], dx_ref, torch.bfloat16)


def test_autotune_prunes_tiles_larger_than_the_problem():
    """Small problems (decode, these tests on a GPU) time only tiles that fit them; large ones keep
    every config. Pure Python: the prune runs before any compile."""
    import triton

    tiles = [(128, 256), (128, 128), (64, 128), (64, 64)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64}) for m, n in tiles]
    prune = moe_triton._prune_to_problem({"BLOCK_M": "ROWS_BUCKET", "BLOCK_N": "I"})

    def kept(**extents):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in prune(configs, extents)]

    assert kept(ROWS_BUCKET=2, I=16) == [(64, 64)]  # both below the 64 floor
    assert kept(ROWS_BUCKET=100, I=100) == [(128, 128), (64, 128), (64, 64)]  # limits 128, 128
    assert kept(ROWS_BUCKET=512, I=768) == tiles
    # Nothing within bounds: the smallest tiles, never an empty list.
    assert prune(configs[:2], {"ROWS_BUCKET": 1, "I": 1}) == [configs[1]]
    # The GPU tile lists at a test shape: one or two configs left to compile per kernel.
    gpu = {
        kind: [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}) for m, n, k, *_ in tiles]
        for kind, tiles in moe_triton._GPU_TILES.items()
    }
    small = {"ROWS_BUCKET": 4, "H": 40, "I": 24, "N": 40, "K_DIM": 24, "M": 40}
    dual = moe_triton._prune_to_problem({"BLOCK_M": "ROWS_BUCKET", "BLOCK_N": "I", "BLOCK_K": "H"})
    triple = moe_triton._prune_to_problem({"BLOCK_M": "ROWS_BUCKET", "BLOCK_K": "H"})
    assert len(dual(gpu["dual"], small)) == 1 and len(triple(gpu["triple"], small)) == 2
    for kernel in (
        moe_triton._gate_up_swiglu_kernel,
        moe_triton._scatter_down_kernel,
        moe_triton._swiglu_backward_kernel,
        moe_triton._expert_weight_grad_kernel,
    ):
        assert kernel.early_config_prune is not None


@pytest.mark.parametrize(
    "case",
    [
        (33, 24, 16, 7, 2, "skewed"),
        (5, 40, 24, 4, 2, "random"),
        (9, 24, 16, 4, 1, "one"),
        (33, 40, 16, 7, 2, "sparse"),
    ],
)
def test_cpu_grouped_mm_path_equals_the_expert_loop_cpu(case, monkeypatch):
    """On CPU the reference's GEMMs run as `torch._grouped_mm` (one call over every expert):
    forward and hand-written backward equal, bit for bit, the per-expert `mm` loop."""
    from padd.kernels.grouped_gemm import reference as ref

    x, w13, w2, r = make_inputs(*case)
    grad = torch.randn_like(x)
    fast = moe_ffn_reference_forward(x, w13, w2, r)
    fast_grads = moe_ffn_reference_backward(grad, x, w13, w2, r, fast[1])
    monkeypatch.setattr(ref, "_HAS_GROUPED_MM", False)
    loop = moe_ffn_reference_forward(x, w13, w2, r)
    loop_grads = moe_ffn_reference_backward(grad, x, w13, w2, r, loop[1])
    for a, b in zip((*fast, *fast_grads), (*loop, *loop_grads), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_cpu_eager_path_equals_the_custom_op_cpu():
    """Eager CPU calls with a gradient skip the custom ops (an autograd.Function over the same
    forward and backward): same output and gradients bit for bit as through `padd::moe_ffn`."""
    from padd.kernels.grouped_gemm.activation import GatedActivation
    from padd.kernels.grouped_gemm.op import moe_ffn_op_from_routing

    x, w13, w2, r = make_inputs(33, 24, 16, 7, 2, "skewed")
    grad = torch.randn_like(x)
    out, grads = fwd_bwd(x, w13, w2, r, "auto", grad)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w13, w2, r.weights)]
    r_op = Routing(**{**r.__dict__, "weights": leaves[3]})
    act = GatedActivation()
    want = moe_ffn_op_from_routing(*leaves[:3], r_op, activation=act, gate_up_bias=None, down_bias=None,
                                   use_triton=False)  # fmt: skip
    want_grads = torch.autograd.grad(want, leaves, grad)
    assert torch.equal(out, want)
    for a, b in zip(grads, want_grads, strict=True):
        assert torch.equal(a, b)
