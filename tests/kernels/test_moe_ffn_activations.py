"""moe_ffn's gated activations, interleaved gate/up and biases, against a dense fp64 loop.

The oracle writes each activation the way transformers' experts classes do (clamp, SiLU,
sigmoid, tanh soft caps), per token and expert, in fp64, and autograd differentiates it. Inputs
are scaled so that pre-activations pass the clamp bound (and reach several times the soft caps)
on a good share of entries, and one expert is empty.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from padd.kernels import Routing, moe_ffn, routing_from_topk
from padd.kernels.grouped_gemm.activation import GATED_ACTIVATIONS as ACTIVATIONS
from padd.kernels.grouped_gemm.activation import GatedActivation
from torch.utils.flop_counter import FlopCounterMode

LIMIT = 3.0
ALPHA = 1.702
# Soft caps of "swiglu_softcap" (Inkling2's defaults are 4 and 25): pre-activations ~N(0, 12) here
# reach 3-10x them on a good share of entries, where tanh saturates.
GATE_SOFTCAP = 1.0
UP_SOFTCAP = 1.25


def oracle_activation(gate_up: torch.Tensor, name: str, interleaved: bool) -> torch.Tensor:
    """The activations as transformers' `_apply_gate` methods write them."""
    if interleaved:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    if name == "swiglu":
        return F.silu(gate) * up
    if name == "swiglu_limit":  # DeepSeek-V4
        return F.silu(gate.clamp(max=LIMIT)) * up.clamp(min=-LIMIT, max=LIMIT)
    if name == "swiglu_limit_post":  # Step3p7
        return F.silu(gate).clamp(max=LIMIT) * up.clamp(min=-LIMIT, max=LIMIT)
    if name == "swiglu_softcap":  # Inkling2SoftcappedSwiGLU
        soft_gate = torch.tanh(gate / GATE_SOFTCAP) * GATE_SOFTCAP
        return soft_gate * torch.sigmoid(gate) * (torch.tanh(up / UP_SOFTCAP) * UP_SOFTCAP)
    gate = gate.clamp(max=LIMIT)  # GPT-OSS
    up = up.clamp(min=-LIMIT, max=LIMIT)
    return (up + 1) * (gate * torch.sigmoid(gate * ALPHA))


def dense_oracle(x, w13, w2, experts_TK, weights_TK, b13, b2, name, interleaved):
    """fp64, token by token: `Σ_j w_tj (W2_e act(W13_e x_t + b13_e) + b2_e)`."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(experts_TK.shape[1]):
            e = int(experts_TK[t, j])
            gate_up = w13[e] @ x[t] + (b13[e] if b13 is not None else 0)
            y = w2[e] @ oracle_activation(gate_up, name, interleaved) + (b2[e] if b2 is not None else 0)
            acc = acc + weights_TK[t, j] * y
        rows.append(acc)
    return torch.stack(rows)


def make_case(seed: int, with_bias: bool, T=19, H=12, I=8, E=5, K=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64)  # pre-activations ~ N(0, 12)
    w2 = torch.randn(E, H, I, generator=g, dtype=torch.float64) / I**0.5
    # Expert 3 gets no token; ties between slots of one token cannot happen (distinct ids).
    pool = torch.tensor([0, 1, 2, 4])
    experts_TK = pool[torch.rand(T, pool.numel(), generator=g).topk(K, dim=1).indices]
    weights_TK = torch.rand(T, K, generator=g, dtype=torch.float64)
    b13 = torch.randn(E, 2 * I, generator=g, dtype=torch.float64) if with_bias else None
    b2 = torch.randn(E, H, generator=g, dtype=torch.float64) if with_bias else None
    return x, w13, w2, experts_TK, weights_TK, b13, b2


def _params(name) -> dict:
    """The activation's parameters, as `moe_ffn` and `GatedActivation` take them by name."""
    if name == "swiglu_softcap":
        return dict(gate_softcap=GATE_SOFTCAP, up_softcap=UP_SOFTCAP)
    return dict(limit=None if name == "swiglu" else LIMIT, alpha=ALPHA if name == "gpt_oss" else None)


CASES = [(n, inter, bias) for n in ACTIVATIONS for inter in (False, True) for bias in (False, True)]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(("name", "interleaved", "with_bias"), CASES)
def test_activation_forward_and_backward_match_dense_oracle(name, interleaved, with_bias, backend):
    x, w13, w2, experts_TK, weights_TK, b13, b2 = make_case(
        CASES.index((name, interleaved, with_bias)), with_bias
    )
    params = _params(name)
    oracle_inputs = [t.clone().requires_grad_() for t in (x, w13, w2, weights_TK)]
    oracle_biases = [None if b is None else b.clone().requires_grad_() for b in (b13, b2)]
    want = dense_oracle(*oracle_inputs[:3], experts_TK, oracle_inputs[3], *oracle_biases, name, interleaved)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(
        want, [*oracle_inputs, *[b for b in oracle_biases if b is not None]], grad
    )

    leaves = [t.float().requires_grad_() for t in (x, w13, w2, weights_TK)]
    biases = [None if b is None else b.float().requires_grad_() for b in (b13, b2)]
    routing = routing_from_topk(experts_TK, leaves[3], w13.shape[0])
    got = moe_ffn(
        *leaves[:3],
        routing,
        activation=name,
        **params,
        gate_up_interleaved=interleaved,
        gate_up_bias=biases[0],
        down_bias=biases[1],
        backend=backend,
    )
    got_grads = torch.autograd.grad(got, [*leaves, *[b for b in biases if b is not None]], grad.float())
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-4)
    names = ["x", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias"]
    for label, g, w in zip(names, got_grads, want_grads, strict=False):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=label)


def test_inputs_do_pass_the_clamp():
    """The oracle cases above only test clamps if pre-activations reach past the limit."""
    x, w13, *_ = make_case(0, False)
    gate_up = torch.einsum("eoh,th->teo", w13, x)
    assert (gate_up.abs() > LIMIT).double().mean() > 0.2


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_backward_matches_autograd_at_the_bounds(name):
    """Entries exactly at ±L, just inside and just outside: the clamp masks are inclusive."""
    act = GatedActivation(name, **_params(name))
    edge = torch.tensor([-LIMIT - 1e-3, -LIMIT, -LIMIT + 1e-3, 0.0, LIMIT - 1e-3, LIMIT, LIMIT + 1e-3, 9.0])
    # silu(g) == L for the post-clamp form: include that gate value too.
    silu_at_limit = torch.tensor(3.1588)  # silu(3.1588) ≈ 3.0
    gate = torch.cat([edge, silu_at_limit.view(1)]).double()
    up = torch.cat([edge.flip(0), torch.tensor([1.0])]).double()
    gate_up = torch.cat([gate, up]).view(1, -1).requires_grad_()
    h = oracle_activation(gate_up, name, False)
    dh = torch.randn_like(h)
    (want,) = torch.autograd.grad(h, gate_up, dh)
    torch.testing.assert_close(act.forward(gate_up.detach()), h.detach())
    torch.testing.assert_close(act.backward(dh, gate_up.detach()), want)


def test_flops_of_a_biased_gated_call_are_the_gemms():
    x, w13, w2, experts_TK, weights_TK, b13, b2 = make_case(1, True)
    routing = routing_from_topk(experts_TK, weights_TK.float(), w13.shape[0])
    args = [t.float().requires_grad_() for t in (x, w13, w2)]
    with FlopCounterMode(display=False) as counter:
        moe_ffn(*args, routing, activation="gpt_oss", limit=LIMIT, alpha=ALPHA, gate_up_bias=b13.float())
    T, K, H, I = x.shape[0], 2, x.shape[1], w2.shape[2]
    assert counter.get_total_flops() == 2 * T * K * H * 3 * I


def test_bad_activation_arguments_fail_before_compute():
    x, w13, w2, experts_TK, weights_TK, b13, b2 = make_case(2, True)
    r = routing_from_topk(experts_TK, weights_TK.float(), w13.shape[0])
    args = (x.float(), w13.float(), w2.float(), r)
    with pytest.raises(ValueError, match="activation must be one of"):
        moe_ffn(*args, activation="geglu")
    with pytest.raises(ValueError, match="takes no limit"):
        moe_ffn(*args, limit=7.0)
    with pytest.raises(ValueError, match="needs a numeric alpha"):
        moe_ffn(*args, activation="gpt_oss", limit=7.0)
    with pytest.raises(ValueError, match="limit must be a positive"):
        moe_ffn(*args, activation="swiglu_limit", limit=-1.0)
    with pytest.raises(ValueError, match=r"gate_up_bias must be \[5, 16\]"):
        moe_ffn(*args, gate_up_bias=b2.float())


def test_custom_op_schema_with_biases():
    """`torch.library.opcheck`: schema, fake tensor, autograd registration of the biased op."""
    x, w13, w2, experts_TK, weights_TK, b13, b2 = make_case(3, True, T=6)
    r = routing_from_topk(experts_TK, weights_TK.float(), w13.shape[0])
    fields = (r.weights, r.expert_ids, r.tokens_per_expert, r.expert_offsets, r.sort_order, r.inverse_order)
    tensors = [t.float().requires_grad_() for t in (x, w13, w2)]
    biases = [b.float().requires_grad_() for b in (b13, b2)]
    args = (*tensors, *fields, *biases, "gpt_oss", LIMIT, ALPHA, None, None, True, False)
    torch.library.opcheck(torch.ops.padd.moe_ffn.default, args, test_utils=("test_schema", "test_faketensor"))
    out, _ = torch.ops.padd.moe_ffn(*args)
    grads = torch.autograd.grad(out.sum(), [*tensors, *biases])
    routing = Routing(*fields, w13.shape[0])
    want = moe_ffn(
        *[t.detach().requires_grad_() for t in tensors],
        routing,
        activation="gpt_oss",
        limit=LIMIT,
        alpha=ALPHA,
        gate_up_interleaved=True,
        gate_up_bias=biases[0].detach(),
        down_bias=biases[1].detach(),
        backend="reference",
    )
    torch.testing.assert_close(out, want)
    assert all(g.shape == t.shape for g, t in zip(grads, [*tensors, *biases], strict=True))


@pytest.mark.parametrize(("name", "interleaved"), [(n, i) for n in ACTIVATIONS for i in (False, True)])
def test_triton_activations_match_reference(name, interleaved):
    """The kernels' epilogues (Triton's interpreter on CPU, fp32) against the reference, forward
    and every gradient, with pre-activations past the clamp and an empty expert; a transposed
    view of the weights (GPT-OSS stores `[E, H, 2I]`) goes in as it is."""
    x, w13, w2, experts_TK, weights_TK, _, _ = make_case(ACTIVATIONS.index(name), False, T=21, H=16, I=8)
    params = _params(name)
    w13_t = w13.float().transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2I, H] view of [E, H, 2I]
    results = []
    for backend, gate_up in (("triton", w13_t), ("reference", w13.float())):
        leaves = [t.float().detach().requires_grad_() for t in (x, gate_up, w2, weights_TK)]
        routing = routing_from_topk(experts_TK, leaves[3], w13.shape[0])
        kwargs = dict(activation=name, **params, gate_up_interleaved=interleaved)
        out = moe_ffn(*leaves[:3], routing, backend=backend, **kwargs)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    for label, g, g_ref in zip(["x", "gate_up_proj", "down_proj", "weights"], grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4, msg=label)


# "swiglu_softcap" (Inkling2): the formula checked on its own, far past the caps, then the kernels.


def _plain_softcap(gate, up, c_g, c_u):
    """Inkling2SoftcappedSwiGLU's formula in plain torch, for autograd."""
    return (torch.tanh(gate / c_g) * c_g) * torch.sigmoid(gate) * (torch.tanh(up / c_u) * c_u)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("c_g", "c_u"), [(4.0, 25.0), (GATE_SOFTCAP, UP_SOFTCAP), (0.3, 7.0)])
def test_softcap_reference_matches_autograd_past_the_caps(c_g, c_u, dtype):
    """Forward and hand-written backward of activation.py against autograd of the plain formula,
    pre-activations spread over ±5 caps (tanh saturated) with exact zeros and exact ±caps, in
    both gate/up layouts."""
    g = torch.Generator().manual_seed(11)
    rows, inter = 6, 16
    gate = (torch.rand(rows, inter, generator=g, dtype=torch.float64) * 2 - 1) * 5 * c_g
    up = (torch.rand(rows, inter, generator=g, dtype=torch.float64) * 2 - 1) * 5 * c_u
    gate[0, :4] = torch.tensor([0.0, c_g, -c_g, 3 * c_g])
    up[0, :4] = torch.tensor([c_u, 0.0, -4 * c_u, -c_u])
    assert (gate.abs() > 3 * c_g).double().mean() > 0.3 and (up.abs() > 3 * c_u).double().mean() > 0.3
    gate, up = gate.to(dtype).requires_grad_(), up.to(dtype).requires_grad_()
    want = _plain_softcap(gate, up, c_g, c_u)
    dh = torch.randn(want.shape, generator=g, dtype=torch.float64).to(dtype)
    want_d_gate, want_d_up = torch.autograd.grad(want, (gate, up), dh)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for interleaved in (False, True):
        act = GatedActivation("swiglu_softcap", interleaved=interleaved, gate_softcap=c_g, up_softcap=c_u)
        if interleaved:
            gate_up = torch.stack([gate.detach(), up.detach()], dim=-1).flatten(1)
        else:
            gate_up = torch.cat([gate.detach(), up.detach()], dim=1)
        torch.testing.assert_close(act.forward(gate_up), want.detach(), **tol)
        d_gate, d_up = act.split(act.backward(dh, gate_up))
        torch.testing.assert_close(d_gate, want_d_gate, **tol)
        torch.testing.assert_close(d_up, want_d_up, **tol)


def test_softcap_forward_equals_transformers_inkling2():
    """Bit for bit the module transformers' Inkling2 experts call (fp32 math, cast back)."""
    modeling = pytest.importorskip("transformers.models.inkling2.modeling_inkling2")
    config = type("Config", (), {"mlp_gate_softcap": 4.0, "mlp_up_softcap": 25.0})()
    module = modeling.Inkling2SoftcappedSwiGLU(config)
    gate_up = (torch.rand(8, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 100
    act = GatedActivation("swiglu_softcap", gate_softcap=4.0, up_softcap=25.0)
    for dtype in (torch.float32, torch.bfloat16):
        x = gate_up.to(dtype)
        want = module(*x.chunk(2, dim=-1))
        assert torch.equal(act.forward(x.float()).to(dtype), want)


def test_inputs_reach_past_the_soft_caps():
    x, w13, *_ = make_case(0, False)
    gate, up = torch.einsum("eoh,th->teo", w13, x).chunk(2, dim=-1)
    assert (gate.abs() > 3 * GATE_SOFTCAP).double().mean() > 0.25
    assert (up.abs() > 3 * UP_SOFTCAP).double().mean() > 0.25


@pytest.mark.parametrize("interleaved", [False, True])
def test_triton_softcap_fp16_matches_reference(interleaved):
    """fp16 through the kernels' softcap epilogues (forward and backward) against the reference,
    pre-activations several caps past, an empty expert (expert 3)."""
    x, w13, w2, experts_TK, weights_TK, _, _ = make_case(23, False, T=21, H=16, I=8)
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.half().detach().requires_grad_() for t in (x, w13, w2, weights_TK)]
        routing = routing_from_topk(experts_TK, leaves[3], w13.shape[0])
        assert routing.tokens_per_expert[3] == 0
        out = moe_ffn(*leaves[:3], routing, activation="swiglu_softcap", **_params("swiglu_softcap"),
                      gate_up_interleaved=interleaved, backend=backend)  # fmt: skip
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).half()
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (out, grads), (out_ref, grads_ref) = results
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=2e-2, atol=2e-2)
    for label, g, g_ref in zip(["x", "gate_up_proj", "down_proj", "weights"], grads, grads_ref, strict=True):
        assert g.dtype == torch.float16, label
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=2e-2, atol=2e-2, msg=label)


def test_bad_softcap_arguments_fail_before_compute():
    x, w13, w2, experts_TK, weights_TK, _, _ = make_case(2, False)
    r = routing_from_topk(experts_TK, weights_TK.float(), w13.shape[0])
    args = (x.float(), w13.float(), w2.float(), r)
    with pytest.raises(ValueError, match="needs a finite positive gate_softcap"):
        moe_ffn(*args, activation="swiglu_softcap", up_softcap=25.0)
    with pytest.raises(ValueError, match="needs a finite positive up_softcap"):
        moe_ffn(*args, activation="swiglu_softcap", gate_softcap=4.0)
    for bad in (0.0, -4.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="finite positive gate_softcap"):
            moe_ffn(*args, activation="swiglu_softcap", gate_softcap=bad, up_softcap=25.0)
    with pytest.raises(ValueError, match="takes no limit or alpha"):
        moe_ffn(*args, activation="swiglu_softcap", gate_softcap=4.0, up_softcap=25.0, limit=7.0)
    with pytest.raises(ValueError, match="parameters of activation='swiglu_softcap' only"):
        moe_ffn(*args, activation="swiglu_limit", limit=7.0, up_softcap=25.0)


def test_custom_op_schema_with_softcaps():
    """`torch.library.opcheck` of the op with both soft caps, and its output against the reference."""
    x, w13, w2, experts_TK, weights_TK, _, _ = make_case(4, False, T=6)
    r = routing_from_topk(experts_TK, weights_TK.float(), w13.shape[0])
    fields = (r.weights, r.expert_ids, r.tokens_per_expert, r.expert_offsets, r.sort_order, r.inverse_order)
    tensors = [t.float().requires_grad_() for t in (x, w13, w2)]
    options = ("swiglu_softcap", None, None, GATE_SOFTCAP, UP_SOFTCAP, False, False)  # no limit or alpha
    args = (*tensors, *fields, None, None, *options)  # no biases
    torch.library.opcheck(torch.ops.padd.moe_ffn.default, args, test_utils=("test_schema", "test_faketensor"))
    out, _ = torch.ops.padd.moe_ffn(*args)
    want = moe_ffn(*[t.detach() for t in tensors], r, activation="swiglu_softcap",
                   **_params("swiglu_softcap"), backend="reference")  # fmt: skip
    torch.testing.assert_close(out, want)
