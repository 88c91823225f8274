"""Routing: the reference against hand-computed results and a naive loop, the Triton kernel and the
`padd::route` op against the reference, forward and backward, edges, errors and torch.compile.

Shape legend: T tokens, E experts, K = top_k, S = T·K slots.
The Triton kernel runs in the CPU interpreter here (tests/conftest.py), so its grid is a lean,
representative subset; the cheap reference checks sweep the full grid.
"""

from __future__ import annotations

import math

import pytest
import torch
from offline_compile import assert_compiles_offline_for_sm90
from padd.kernels import route, route_reference, routing_from_topk, routing_metadata
from padd.kernels.routing import triton as routing_triton

FIELDS_INT = ("expert_ids", "tokens_per_expert", "expert_offsets", "sort_order", "inverse_order")
FIELDS_FLOAT = ("weights", "scores", "logsumexp")
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-2), torch.bfloat16: (1e-2, 2e-2)}

T_GRID = (0, 1, 7, 130)
E_GRID = (3, 60, 64, 128, 256)


def _k_grid(num_experts: int) -> list[int]:
    ks = {1, 2, 8} if num_experts >= 8 else {1, 2, num_experts}
    return sorted(k for k in ks if k <= num_experts)


def _poisoned_empty(*shape, dtype, device):
    """Allocator that fills outputs with NaN / INT32_MIN, so an unwritten element fails a test."""
    fill = float("nan") if dtype.is_floating_point else -(2**31)
    return torch.full(shape, fill, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _poison_triton_outputs(monkeypatch):
    monkeypatch.setattr(routing_triton, "_empty", _poisoned_empty)


def _assert_same_routing(got, want, *, atol=1e-6, rtol=1e-5):
    for name in FIELDS_INT:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.int32, name
        assert torch.equal(a.cpu(), b.cpu()), name
    for name in FIELDS_FLOAT:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == torch.float32, name
            torch.testing.assert_close(a.cpu(), b.cpu(), atol=atol, rtol=rtol, msg=name)


def _assert_invariants(r, num_experts: int):
    num_slots = r.num_tokens * r.top_k
    order_S, inverse_S = r.sort_order.long(), r.inverse_order.long()
    assert torch.equal(inverse_S[order_S], torch.arange(num_slots, device=order_S.device))
    assert int(r.tokens_per_expert.sum()) == num_slots
    assert r.expert_offsets[0] == 0
    assert torch.equal(r.expert_offsets[1:].long(), torch.cumsum(r.tokens_per_expert.long(), 0))
    sorted_experts_S = r.expert_ids.reshape(-1)[order_S]
    assert bool((sorted_experts_S[1:] >= sorted_experts_S[:-1]).all())
    assert bool(((r.expert_ids >= 0) & (r.expert_ids < num_experts)).all())


def _naive_route(logits_TE, top_k, score, bias_E, renormalize):
    """Independent per-token loop in plain Python floats: the oracle for the reference itself."""
    num_experts = logits_TE.shape[1]
    # The key is defined as the fp32 sum logits + bias (softmax), sigmoid(logits) + bias (sigmoid,
    # DeepSeek-V3), or the logits without a bias; everything after it is plain Python.
    base_TE = (
        torch.sigmoid(logits_TE.float()) if score == "sigmoid" and bias_E is not None else logits_TE.float()
    )
    keys_TE = (base_TE + (bias_E.float() if bias_E is not None else 0.0)).tolist()
    experts, weights = [], []
    for row, key in zip(logits_TE.double().tolist(), keys_TE, strict=True):
        # Python's sort is stable: equal keys keep ascending ids, i.e. ties go to the lower id.
        chosen = sorted(range(num_experts), key=lambda e: -key[e])[:top_k]
        if score == "softmax":
            top = max(row)
            total = sum(math.exp(v - top) for v in row)
            w = [math.exp(row[e] - top) / total for e in chosen]
        else:
            w = [1 / (1 + math.exp(-row[e])) for e in chosen]
        if renormalize:
            w = [v / max(sum(w), 1e-20) for v in w]
        experts.append(chosen)
        weights.append(w)
    slots = [(e, s) for s, e in enumerate(e for row in experts for e in row)]
    order = [s for _, s in sorted(slots)]
    counts = [sum(1 for e, _ in slots if e == i) for i in range(num_experts)]
    return experts, weights, order, counts


def _logits(num_tokens, num_experts, dtype=torch.float32, device=None):
    return torch.randn(num_tokens, num_experts, device=device).to(dtype)


# ---------------------------------------------------------------- the reference itself


def test_reference_hand_example():
    logits_TE = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    r = route_reference(logits_TE, 2, return_scores=True)
    # Token 1 ties experts 0 and 1 for second place: the lower id wins.
    assert r.expert_ids.tolist() == [[0, 1], [2, 0]]
    e = math.e
    w0 = [e**2 / (e**2 + e), e / (e**2 + e)]
    w1 = [e**5 / (e**5 + 1), 1 / (e**5 + 1)]
    torch.testing.assert_close(r.weights, torch.tensor([w0, w1]))
    torch.testing.assert_close(r.logsumexp, torch.tensor([math.log(e**2 + e + 1), math.log(2 + e**5)]))
    assert r.tokens_per_expert.tolist() == [2, 1, 1]
    assert r.expert_offsets.tolist() == [0, 2, 3, 4]
    # slots: 0=(t0,e0) 1=(t0,e1) 2=(t1,e2) 3=(t1,e0); by expert, stably: 0, 3 | 1 | 2.
    assert r.sort_order.tolist() == [0, 3, 1, 2]
    assert r.inverse_order.tolist() == [0, 2, 3, 1]


def test_reference_hand_example_bias_selects_only():
    logits_TE = torch.tensor([[2.0, 1.0, 0.0]])
    bias_E = torch.tensor([0.0, 0.0, 3.0])
    r = route_reference(logits_TE, 1, score="sigmoid", selection_bias=bias_E, renormalize=False)
    assert r.expert_ids.tolist() == [[2]]
    torch.testing.assert_close(r.weights, torch.tensor([[1 / (1 + math.exp(0.0))]]))
    assert r.logsumexp is None


@pytest.mark.parametrize("num_tokens", T_GRID)
@pytest.mark.parametrize("num_experts", E_GRID)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_reference_matches_naive_loop(num_tokens, num_experts, score):
    logits_TE = _logits(num_tokens, num_experts)
    bias_E = torch.randn(num_experts)
    for top_k in _k_grid(num_experts):
        for bias, renormalize in ((None, True), (bias_E, False)):
            r = route_reference(logits_TE, top_k, score=score, selection_bias=bias, renormalize=renormalize)
            experts, weights, order, counts = _naive_route(logits_TE, top_k, score, bias, renormalize)
            assert r.expert_ids.tolist() == experts
            assert r.sort_order.tolist() == order
            assert r.tokens_per_expert.tolist() == counts
            want_TK = torch.tensor(weights, dtype=torch.float32).reshape(num_tokens, top_k)
            torch.testing.assert_close(r.weights, want_TK)
            _assert_invariants(r, num_experts)


# ---------------------------------------------------------------- Triton kernel vs reference

# (T, E, K, score, bias, renormalize): every T, E and K of the grid appears, each option both ways.
TRITON_CASES = [
    (0, 3, 1, "softmax", False, True),
    (0, 64, 8, "sigmoid", True, False),
    (1, 3, 3, "softmax", True, True),
    (1, 256, 8, "sigmoid", False, True),
    (7, 3, 2, "sigmoid", True, False),
    (7, 60, 1, "softmax", False, False),
    (7, 64, 2, "sigmoid", False, True),
    (7, 256, 2, "softmax", True, True),
    (130, 60, 8, "softmax", True, True),
    (130, 64, 1, "sigmoid", True, True),
    (130, 128, 8, "sigmoid", False, False),
    (130, 128, 2, "softmax", False, True),
    (130, 256, 8, "softmax", False, False),
    (5, 1, 1, "softmax", True, True),  # a single expert
    (33, 1000, 8, "sigmoid", True, True),  # E beyond the grid: two tokens per tile
]


def _route_both(logits_TE, top_k, score, bias_E, renormalize, backend="triton"):
    kwargs = dict(score=score, selection_bias=bias_E, renormalize=renormalize, return_scores=True)
    return route(logits_TE, top_k, backend=backend, **kwargs), route(
        logits_TE, top_k, backend="reference", **kwargs
    )


@pytest.mark.parametrize("num_tokens,num_experts,top_k,score,use_bias,renormalize", TRITON_CASES)
def test_triton_forward_matches_reference(num_tokens, num_experts, top_k, score, use_bias, renormalize):
    logits_TE = _logits(num_tokens, num_experts)
    bias_E = torch.randn(num_experts) if use_bias else None
    got, want = _route_both(logits_TE, top_k, score, bias_E, renormalize)
    _assert_same_routing(got, want)
    _assert_invariants(got, num_experts)


def test_triton_many_blocks_and_scan_steps(monkeypatch):
    # Tiny tiles: 33 token blocks, three 16-block scan steps, chunks of 8 experts (60 = 7·8 + 4).
    monkeypatch.setattr(routing_triton, "_TILE_ELEMS", 256)
    monkeypatch.setattr(routing_triton, "_SCAN_MAX_BLOCK_B", 16)
    monkeypatch.setattr(routing_triton, "_SCAN_TILE", 128)
    logits_TE = _logits(130, 60)
    got, want = _route_both(logits_TE, 8, "softmax", torch.randn(60), True)
    _assert_same_routing(got, want)


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(7, 60, 8), (130, 64, 2)])
def test_triton_fp16_logits(num_tokens, num_experts, top_k):
    logits_TE = _logits(num_tokens, num_experts, torch.float16)
    got, want = _route_both(logits_TE, top_k, "softmax", torch.randn(num_experts), True)
    _assert_same_routing(got, want)


def test_triton_without_scores_and_noncontiguous_logits():
    logits_ET = _logits(64, 33)
    logits_TE = logits_ET.t()  # strided view: the kernel takes strides, no copy
    got = route(logits_TE, 4, backend="triton")
    want = route(logits_TE, 4, backend="reference")
    assert got.scores is None
    _assert_same_routing(got, want)


def test_triton_is_deterministic():
    logits_TE = torch.randint(0, 3, (130, 64)).float()  # many ties
    first = route(logits_TE, 8, backend="triton")
    second = route(logits_TE, 8, backend="triton")
    for name in FIELDS_INT + ("weights",):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_all_tokens_to_one_expert(backend):
    logits_TE = _logits(130, 60)
    logits_TE[:, 37] += 100.0
    got, want = _route_both(logits_TE, 2, "softmax", None, True, backend)
    _assert_same_routing(got, want)
    assert int(got.tokens_per_expert[37]) == 130
    start = int(got.expert_offsets[37])
    assert got.sort_order[start : start + 130].tolist() == list(range(0, 260, 2))


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_exact_ties_go_to_lower_id(backend):
    zeros_TE = torch.zeros(7, 60)
    r = route(zeros_TE, 8, backend=backend)
    assert r.expert_ids.tolist() == [list(range(8))] * 7
    # A bias that equalises two experts' keys: still the lower id.
    logits_TE = torch.tensor([[1.0, 0.0, 2.0, 0.5]])
    bias_E = torch.tensor([0.0, 1.0, -1.0, 0.0])  # keys 1, 1, 1, 0.5
    r = route(logits_TE, 2, selection_bias=bias_E, backend=backend)
    assert r.expert_ids.tolist() == [[0, 1]]
    signed_zeros_TE = torch.tensor([[-1.0, -0.0, 0.0, -0.0]])  # -0.0 == 0.0: still the lower id
    got, want = _route_both(signed_zeros_TE, 2, "softmax", None, True, backend)
    assert got.expert_ids.tolist() == want.expert_ids.tolist() == [[1, 2]]
    ties_TE = torch.randint(0, 3, (130, 64)).float()
    got, want = _route_both(ties_TE, 8, "sigmoid", None, False, backend)
    _assert_same_routing(got, want)


def test_triton_minus_inf_logits_pick_distinct_lower_ids():
    logits_TE = torch.full((2, 5), float("-inf"))
    logits_TE[:, 3] = 0.0
    got, want = _route_both(logits_TE, 3, "softmax", None, True)
    assert got.expert_ids.tolist() == [[3, 0, 1]] * 2
    _assert_same_routing(got, want)


# ---------------------------------------------------------------- routing_from_topk


def _random_experts(num_tokens, num_experts, top_k, *, repeats=False):
    if repeats:
        return torch.randint(0, num_experts, (num_tokens, top_k))
    return torch.rand(num_tokens, num_experts).argsort(dim=-1)[:, :top_k]  # distinct per token


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,repeats",
    [(0, 8, 2, False), (1, 3, 3, False), (130, 60, 8, False), (130, 5, 6, True)],
)
def test_routing_from_topk_matches_torch_metadata(backend, num_tokens, num_experts, top_k, repeats):
    experts_TK = _random_experts(num_tokens, num_experts, top_k, repeats=repeats)
    r = routing_from_topk(experts_TK, torch.rand(num_tokens, top_k), num_experts, backend=backend)
    want = routing_metadata(experts_TK, num_experts)
    got = (r.tokens_per_expert, r.expert_offsets, r.sort_order, r.inverse_order)
    for name, a, b in zip(FIELDS_INT[1:], got, want, strict=True):
        assert a.dtype == torch.int32 and torch.equal(a, b), name
    _assert_invariants(r, num_experts)


def test_routing_from_topk_compiles_fullgraph_and_runs_on_meta():
    experts_TK, weights_TK = _random_experts(7, 12, 2), torch.rand(7, 2)
    fn = lambda e, w: routing_from_topk(e, w, 12).sort_order
    assert torch.equal(
        torch.compile(fn, fullgraph=True, backend="aot_eager")(experts_TK, weights_TK),
        fn(experts_TK, weights_TK),
    )
    r = routing_from_topk(experts_TK.to("meta"), weights_TK.to("meta"), 12)
    assert r.sort_order.shape == (14,) and r.expert_offsets.shape == (13,)


# ---------------------------------------------------------------- backward


def _grads(r, logits_TE, grad_w_TK, grad_s_TE, grad_lse_T):
    loss = (r.weights * grad_w_TK).sum() + (r.scores * grad_s_TE).sum()
    if r.logsumexp is not None:
        loss = loss + (r.logsumexp * grad_lse_T).sum()
    return torch.autograd.grad(loss, logits_TE)[0]


BACKWARD_CASES = [
    (7, 3, 2, "softmax", True, torch.float32),
    (130, 60, 8, "softmax", False, torch.float32),
    (130, 64, 2, "sigmoid", True, torch.float32),
    (7, 256, 8, "sigmoid", False, torch.float32),
    (1, 128, 8, "softmax", True, torch.float16),
    (0, 64, 2, "softmax", True, torch.float32),
]


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("num_tokens,num_experts,top_k,score,renormalize,dtype", BACKWARD_CASES)
def test_backward_matches_reference_autograd(
    backend, num_tokens, num_experts, top_k, score, renormalize, dtype
):
    logits_TE = _logits(num_tokens, num_experts, dtype).requires_grad_()
    bias_E = torch.randn(num_experts, requires_grad=True)
    got, want = _route_both(logits_TE, top_k, score, bias_E, renormalize, backend)
    grad_w_TK = torch.randn(num_tokens, top_k)
    grad_s_TE = torch.randn(num_tokens, num_experts)
    grad_lse_T = torch.randn(num_tokens)
    dx_got = _grads(got, logits_TE, grad_w_TK, grad_s_TE, grad_lse_T)
    dx_want = _grads(want, logits_TE, grad_w_TK, grad_s_TE, grad_lse_T)
    assert dx_got.dtype == dtype
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(dx_got, dx_want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_backward_through_weights_only(backend):
    logits_TE = _logits(7, 60).requires_grad_()
    grad_w_TK = torch.randn(7, 8)
    dx = [
        torch.autograd.grad((route(logits_TE, 8, backend=b).weights * grad_w_TK).sum(), logits_TE)[0]
        for b in (backend, "reference")
    ]
    torch.testing.assert_close(dx[0], dx[1])


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_bias_gets_no_gradient_and_never_enters_weights(backend):
    logits_TE = _logits(7, 60).requires_grad_()
    bias_E = (10 * torch.randn(60)).requires_grad_()
    r = route(logits_TE, 8, selection_bias=bias_E, renormalize=False, return_scores=True, backend=backend)
    torch.testing.assert_close(r.weights, torch.gather(r.scores, 1, r.expert_ids.long()))
    grads = torch.autograd.grad(r.weights.sum(), [logits_TE, bias_E], allow_unused=True)
    assert grads[0] is not None and grads[1] is None


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "make_args,error",
    [
        (lambda: (torch.randn(4, 3), 4, {}), ValueError),  # top_k > E
        (lambda: (torch.randn(4, 3), 0, {}), ValueError),
        (lambda: (torch.randn(3), 1, {}), ValueError),  # rank 1
        (lambda: (torch.randn(2, 4, 3), 1, {}), ValueError),  # rank 3
        (lambda: (torch.randint(0, 5, (4, 3)), 1, {}), TypeError),  # integer logits
        (lambda: (torch.randn(4, 3, dtype=torch.float64), 1, {}), TypeError),
        (lambda: (torch.randn(4, 3), 2.0, {}), TypeError),  # non-int top_k
        (lambda: (torch.randn(4, 3), True, {}), TypeError),
        (lambda: (torch.randn(4, 3), 1, {"selection_bias": torch.randn(4)}), ValueError),
        (lambda: (torch.randn(4, 3), 1, {"selection_bias": torch.randn(1, 3)}), ValueError),
        (lambda: (torch.randn(4, 3), 1, {"selection_bias": [0.0, 0.0, 0.0]}), TypeError),
        (lambda: (torch.randn(4, 3), 1, {"selection_bias": torch.zeros(3, dtype=torch.int64)}), TypeError),
        (lambda: (torch.randn(4, 3), 1, {"score": "relu"}), ValueError),
        (lambda: (torch.randn(4, 3), 1, {"selection_bias": torch.zeros(3, device="meta")}), ValueError),
        (lambda: (torch.randn(4, 3), 1, {"backend": "cuda"}), ValueError),
        (lambda: ([[1.0, 2.0]], 1, {}), TypeError),
    ],
)
def test_input_errors(make_args, error):
    logits, top_k, kwargs = make_args()
    with pytest.raises(error):
        route(logits, top_k, **kwargs)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_custom_ops_pass_opcheck(backend):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch of both ops.
    logits_TE, bias_E = _logits(7, 12).requires_grad_(), torch.randn(12)
    for args in (
        (logits_TE, 3, "softmax", bias_E, True, True),
        (logits_TE, 2, "sigmoid", None, False, False),
    ):
        torch.library.opcheck(torch.ops.padd.route.default, (*args, backend))
    experts_TK = torch.stack([torch.randperm(12)[:3] for _ in range(7)]).int()
    grads = (torch.randn(7, 3), torch.randn(7, 12), torch.randn(7))
    bwd_args = (logits_TE.detach(), torch.randn(7), experts_TK, *grads, "softmax", True, backend)
    torch.library.opcheck(torch.ops.padd.route_backward.default, bwd_args)
    for ids_TK in (experts_TK, experts_TK.long()):
        torch.library.opcheck(torch.ops.padd.routing_metadata.default, (ids_TK, 12, backend))


def _routed_loss(logits_TE, bias_E):
    r = route(logits_TE, 2, selection_bias=bias_E, return_scores=True)
    weighted_S = r.weights.reshape(-1)[r.sort_order.long()]
    return weighted_S.square().sum() + r.aux_loss() + r.z_loss(), r.tokens_per_expert


def test_torch_compile_fullgraph_matches_eager():
    logits_TE, bias_E = _logits(7, 60), torch.randn(60)
    loss_c, counts_c = torch.compile(_routed_loss, fullgraph=True)(logits_TE, bias_E)
    loss_e, counts_e = _routed_loss(logits_TE, bias_E)
    torch.testing.assert_close(loss_c, loss_e)
    assert torch.equal(counts_c, counts_e)


def test_torch_compile_fullgraph_backward_matches_eager():
    # aot_eager traces the same joint graph through register_autograd as inductor, but compiles
    # in a second rather than half a minute on 2 cores.
    logits_TE, bias_E = _logits(7, 60).requires_grad_(), torch.randn(60)
    compiled = torch.compile(_routed_loss, fullgraph=True, backend="aot_eager")
    (dx_c,) = torch.autograd.grad(compiled(logits_TE, bias_E)[0], logits_TE)
    (dx_e,) = torch.autograd.grad(_routed_loss(logits_TE, bias_E)[0], logits_TE)
    torch.testing.assert_close(dx_c, dx_e)


# ---------------------------------------------------------------- real compiler, no GPU

_SM90_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from padd.kernels.routing import triton as rt

PTRS = {"logits_ptr": "*bf16", "grad_logits_ptr": "*bf16", "bias_ptr": "*fp32", "weights_ptr": "*fp32",
        "scores_ptr": "*fp32", "lse_ptr": "*fp32", "grad_weights_ptr": "*fp32", "grad_scores_ptr": "*fp32",
        "grad_lse_ptr": "*fp32"}

def compile_sm90(kernel, consts, warps=8):
    sig = {n: "constexpr" if n in consts else PTRS.get(n, "*i32" if n.endswith("_ptr") else "i32")
           for n in kernel.arg_names}
    src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(n),): v for n, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

tile = dict(BLOCK_T=16, BLOCK_E=128)
compile_sm90(rt._route_topk_kernel, dict(K=8, SOFTMAX=True, HAS_BIAS=True, RENORMALIZE=True,
             WRITE_SCORES=True, MIN_SUM=1e-20, BLOCK_K=8, **tile))
compile_sm90(rt._route_backward_kernel, dict(K=8, SOFTMAX=True, RENORMALIZE=True, HAS_GRAD_W=True,
             HAS_GRAD_SCORES=True, HAS_GRAD_LSE=True, MIN_SUM=1e-20, **tile))
compile_sm90(rt._route_scan_kernel, dict(BLOCK_B=1024, BLOCK_EC=4))
compile_sm90(rt._route_permute_kernel, dict(K=8, **tile))
compile_sm90(rt._route_histogram_kernel, dict(K=8, **tile))
print("compiled")
"""


def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter skips Triton's code generator: lower every kernel to sm_90 offline."""
    assert_compiles_offline_for_sm90(_SM90_COMPILE)


# ---------------------------------------------------------------- GPU (bf16, larger shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k", [(1, 60, 8), (4097, 128, 8), (3000, 256, 8), (513, 64, 4)]
)
def test_gpu_triton_matches_reference(dtype, num_tokens, num_experts, top_k):
    logits_TE = _logits(num_tokens, num_experts, dtype, "cuda").requires_grad_()
    bias_E = torch.randn(num_experts, device="cuda")
    got, want = _route_both(logits_TE, top_k, "softmax", bias_E, True)
    _assert_same_routing(got, want, atol=1e-5, rtol=1e-4)
    _assert_invariants(got, num_experts)
    grad_w_TK = torch.randn(num_tokens, top_k, device="cuda")
    grad_s_TE = torch.randn(num_tokens, num_experts, device="cuda")
    grad_lse_T = torch.randn(num_tokens, device="cuda")
    dx_got = _grads(got, logits_TE, grad_w_TK, grad_s_TE, grad_lse_T)
    dx_want = _grads(want, logits_TE, grad_w_TK, grad_s_TE, grad_lse_T)
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(dx_got, dx_want, atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_auto_backend_is_triton_and_compiles(monkeypatch):
    calls = []
    forward = routing_triton.route_forward_triton
    monkeypatch.setattr(routing_triton, "route_forward_triton", lambda *a: calls.append(1) or forward(*a))
    logits_TE = _logits(1024, 128, torch.bfloat16, "cuda")
    fn = torch.compile(lambda x: route(x, 8).sort_order, fullgraph=True)
    assert torch.equal(fn(logits_TE), route(logits_TE, 8, backend="reference").sort_order)
    assert calls, "backend='auto' on CUDA should run the Triton kernels"


@pytest.mark.parametrize("top_k", [1, 2, 3, 8, 9])
def test_top_k_ids_equal_the_stable_sort_with_ties_and_infinities(top_k):
    """The CPU top-k (argmax passes for finite keys and k <= 8, the sort otherwise) picks what a
    stable descending sort picks: ties to the lower id, -inf/+inf/NaN rows included."""
    from padd.kernels.routing.reference import top_k_ids_TK

    key_TE = torch.randint(0, 4, (64, 12)).float()  # many ties
    want = torch.sort(key_TE, dim=-1, descending=True, stable=True)[1][:, :top_k]
    assert torch.equal(top_k_ids_TK(key_TE, top_k), want)
    key_TE[3, :] = float("-inf")
    key_TE[5, 2] = float("inf")
    want = torch.sort(key_TE, dim=-1, descending=True, stable=True)[1][:, :top_k]
    assert torch.equal(top_k_ids_TK(key_TE, top_k), want)


def test_softmax_and_logsumexp_match_torch_with_infinities():
    from padd.kernels.routing.reference import softmax_and_logsumexp

    x_TE = torch.randn(6, 5, dtype=torch.float64) * 30
    x_TE[1, 2] = float("-inf")
    x_TE[2, :] = float("-inf")
    x_TE = x_TE.requires_grad_()
    scores, lse = softmax_and_logsumexp(x_TE)
    torch.testing.assert_close(scores, torch.softmax(x_TE, -1), equal_nan=True)
    torch.testing.assert_close(lse, torch.logsumexp(x_TE, -1))
    # Gradients where they are defined (not the all -inf row, whose scores are NaN).
    x_TE = x_TE.detach()[[0, 1, 3, 4, 5]].requires_grad_()
    go_s, go_l = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    scores, lse = softmax_and_logsumexp(x_TE)
    got = torch.autograd.grad((scores * go_s).sum() + (lse * go_l).sum(), x_TE)[0]
    want_s, want_l = torch.softmax(x_TE, -1), torch.logsumexp(x_TE, -1)
    want = torch.autograd.grad((want_s * go_s).sum() + (want_l * go_l).sum(), x_TE)[0]
    torch.testing.assert_close(got, want)
