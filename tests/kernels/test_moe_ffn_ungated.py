"""moe_ffn's non-gated activations (relu², ReLU, SiLU, GELU: experts with `has_gate=False`, such as
Nemotron-H's and Ergo's), whose first weight is the up projection `[E, I, H]` alone.

The oracle is a naive per-token, per-expert fp64 loop written with transformers' own `ACT2FN`
activations, differentiated by autograd; the reference (CPU), the custom op and the Triton kernels
(the interpreter on CPU, fp32) are compared with it, forward and every gradient. One expert gets
no token, and roughly half the pre-activations are negative (the ReLUs' zero region).
"""

from __future__ import annotations

import pytest
import torch
from offline_compile import GROUPED_GEMM_SM90_PRELUDE, assert_compiles_offline_for_sm90
from padd.kernels import Routing, moe_ffn, routing_from_topk
from padd.kernels.grouped_gemm import moe_ffn_flops
from padd.kernels.grouped_gemm.activation import UNGATED_ACTIVATIONS, GatedActivation
from torch.utils.flop_counter import FlopCounterMode
from transformers.activations import ACT2FN


def dense_oracle(x, w1, w2, experts_TK, weights_TK, b1, b2, name):
    """fp64, token by token: `Σ_j w_tj (W2_e act(W1_e x_t + b1_e) + b2_e)`."""
    act = ACT2FN[name]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(experts_TK.shape[1]):
            e = int(experts_TK[t, j])
            up = w1[e] @ x[t] + (b1[e] if b1 is not None else 0)
            y = w2[e] @ act(up) + (b2[e] if b2 is not None else 0)
            acc = acc + weights_TK[t, j] * y
        rows.append(acc)
    return torch.stack(rows)


def make_case(seed: int, with_bias: bool, T=19, H=12, I=8, E=5, K=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w1 = torch.randn(E, I, H, generator=g, dtype=torch.float64) / H**0.5
    w2 = torch.randn(E, H, I, generator=g, dtype=torch.float64) / I**0.5
    pool = torch.tensor([0, 1, 2, 4])  # expert 3 gets no token
    experts_TK = pool[torch.rand(T, pool.numel(), generator=g).topk(K, dim=1).indices]
    weights_TK = torch.rand(T, K, generator=g, dtype=torch.float64)
    b1 = torch.randn(E, I, generator=g, dtype=torch.float64) if with_bias else None
    b2 = torch.randn(E, H, generator=g, dtype=torch.float64) if with_bias else None
    return x, w1, w2, experts_TK, weights_TK, b1, b2


CASES = [(n, bias) for n in UNGATED_ACTIVATIONS for bias in (False, True)]
NAMES = ["x", "up_proj", "down_proj", "weights", "up_bias", "down_bias"]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(("name", "with_bias"), CASES)
def test_ungated_forward_and_backward_match_dense_oracle(name, with_bias, backend):
    x, w1, w2, experts_TK, weights_TK, b1, b2 = make_case(CASES.index((name, with_bias)), with_bias)
    oracle_inputs = [t.clone().requires_grad_() for t in (x, w1, w2, weights_TK)]
    oracle_biases = [None if b is None else b.clone().requires_grad_() for b in (b1, b2)]
    want = dense_oracle(*oracle_inputs[:3], experts_TK, oracle_inputs[3], *oracle_biases, name)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(
        want, [*oracle_inputs, *[b for b in oracle_biases if b is not None]], grad
    )

    leaves = [t.float().requires_grad_() for t in (x, w1, w2, weights_TK)]
    biases = [None if b is None else b.float().requires_grad_() for b in (b1, b2)]
    routing = routing_from_topk(experts_TK, leaves[3], w1.shape[0])
    got = moe_ffn(
        *leaves[:3], routing, activation=name, gate_up_bias=biases[0], down_bias=biases[1], backend=backend
    )
    got_grads = torch.autograd.grad(got, [*leaves, *[b for b in biases if b is not None]], grad.float())
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-4)
    for label, g, w in zip(NAMES, got_grads, want_grads, strict=False):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=label)


def test_inputs_reach_both_sides_of_zero():
    x, w1, *_ = make_case(0, False)
    up = torch.einsum("eih,th->tei", w1, x)
    assert 0.3 < (up < 0).double().mean() < 0.7


@pytest.mark.parametrize("name", UNGATED_ACTIVATIONS)
def test_ungated_activation_backward_matches_autograd(name):
    """`GatedActivation` forward/backward against autograd of `ACT2FN`, zero and ±tiny included."""
    act = GatedActivation(name)
    assert not act.gated and act.width(8) == 8
    up = torch.tensor([[-3.0, -1e-4, 0.0, 1e-4, 0.5, 2.0, 7.0, -0.7]], dtype=torch.float64).requires_grad_()
    h = ACT2FN[name](up)
    dh = torch.randn_like(h)
    (want,) = torch.autograd.grad(h, up, dh)
    torch.testing.assert_close(act.forward(up.detach()), h.detach())
    torch.testing.assert_close(act.backward(dh, up.detach()), want)


@pytest.mark.parametrize("name", UNGATED_ACTIVATIONS)
def test_triton_ungated_matches_reference(name):
    """The kernels' non-gated epilogues (interpreter on CPU, fp32) against the reference, forward
    and every gradient, through a transposed view of the up projection (Ergo stores `[E, H, I]`)."""
    x, w1, w2, experts_TK, weights_TK, _, _ = make_case(
        UNGATED_ACTIVATIONS.index(name), False, T=21, H=16, I=8
    )
    w1_t = w1.float().transpose(1, 2).contiguous().transpose(1, 2)  # [E, I, H] view of [E, H, I]
    results = []
    for backend, up in (("triton", w1_t), ("reference", w1.float())):
        leaves = [t.float().detach().requires_grad_() for t in (x, up, w2, weights_TK)]
        routing = routing_from_topk(experts_TK, leaves[3], w1.shape[0])
        out = moe_ffn(*leaves[:3], routing, activation=name, backend=backend)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    for label, g, g_ref in zip(NAMES, grads, grads_ref, strict=False):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4, msg=label)


def test_flops_of_an_ungated_call_count_a_half_width_first_gemm():
    x, w1, w2, experts_TK, weights_TK, _, _ = make_case(1, False)
    T, K, H, I = x.shape[0], 2, x.shape[1], w2.shape[2]
    args = [t.float().requires_grad_() for t in (x, w1, w2)]
    routing = routing_from_topk(experts_TK, weights_TK.float(), w1.shape[0])
    with FlopCounterMode(display=False) as forward_only:
        out = moe_ffn(*args, routing, activation="relu2")
    assert forward_only.get_total_flops() == moe_ffn_flops(T, K, H, I, gated=False) == 2 * T * K * H * 2 * I
    with FlopCounterMode(display=False) as both:
        out = moe_ffn(*args, routing, activation="relu2")
        out.sum().backward()
    # Backward: dh = dy·W2 (H·I), dx (I·H), d up (I·H), d down (H·I): twice the forward.
    assert both.get_total_flops() == 3 * moe_ffn_flops(T, K, H, I, gated=False)


def test_ungated_shapes_and_arguments_are_checked():
    x, w1, w2, experts_TK, weights_TK, b1, b2 = make_case(2, True)
    r = routing_from_topk(experts_TK, weights_TK.float(), w1.shape[0])
    args = (x.float(), w1.float(), w2.float(), r)
    with pytest.raises(ValueError, match="takes no limit or alpha"):
        moe_ffn(*args, activation="relu2", limit=7.0)
    with pytest.raises(ValueError, match="gate_up_interleaved must be False"):
        moe_ffn(*args, activation="relu2", gate_up_interleaved=True)
    with pytest.raises(ValueError, match=r"up projection"):  # a [E, 2I, H] weight with relu2
        moe_ffn(x.float(), torch.cat([w1, w1], 1).float(), w2.float(), r, activation="relu2")
    with pytest.raises(ValueError, match=r"gate_up_bias must be \[5, 8\]"):
        moe_ffn(*args, activation="relu2", gate_up_bias=b2.float())
    with pytest.raises(ValueError, match="2·I"):  # a gated activation on an odd-width up weight
        moe_ffn(x.float(), w1[:, :7].float(), w2[:, :, :7].float(), r)


def test_custom_op_schema_ungated_with_biases():
    """`torch.library.opcheck` (schema, fake tensor) of the op with an `[E, I, H]` first weight."""
    x, w1, w2, experts_TK, weights_TK, b1, b2 = make_case(3, True, T=6)
    r = routing_from_topk(experts_TK, weights_TK.float(), w1.shape[0])
    fields = (r.weights, r.expert_ids, r.tokens_per_expert, r.expert_offsets, r.sort_order, r.inverse_order)
    tensors = [t.float().requires_grad_() for t in (x, w1, w2)]
    biases = [b.float().requires_grad_() for b in (b1, b2)]
    args = (*tensors, *fields, *biases, "relu2", None, None, None, None, False, False)
    torch.library.opcheck(torch.ops.padd.moe_ffn.default, args, test_utils=("test_schema", "test_faketensor"))
    out, _ = torch.ops.padd.moe_ffn(*args)
    grads = torch.autograd.grad(out.sum(), [*tensors, *biases])
    want = moe_ffn(
        *[t.detach() for t in tensors],
        Routing(*fields, w1.shape[0]),
        activation="relu2",
        gate_up_bias=biases[0].detach(),
        down_bias=biases[1].detach(),
        backend="reference",
    )
    torch.testing.assert_close(out, want)
    assert all(g.shape == t.shape for g, t in zip(grads, [*tensors, *biases], strict=True))


def _no_gate_experts(act: str, transposed: bool, E=4, H=12, I=8):
    """A transformers experts module with `has_gate=False` (Nemotron-H's form), `act_fn = ACT2FN[act]`."""
    from torch import nn
    from transformers.integrations import use_experts_implementation

    @use_experts_implementation(has_gate=False, is_transposed=transposed)
    class NoGateExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            up, down = ((E, H, I), (E, I, H)) if transposed else ((E, I, H), (E, H, I))
            g = torch.Generator().manual_seed(0)
            self.up_proj = nn.Parameter(torch.randn(up, generator=g) / H**0.5)
            self.down_proj = nn.Parameter(torch.randn(down, generator=g) / I**0.5)
            self.act_fn = ACT2FN[act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for t in range(hidden_states.shape[0]):
                for j in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, j])
                    up_w = self.up_proj[e].t() if transposed else self.up_proj[e]
                    down_w = self.down_proj[e].t() if transposed else self.down_proj[e]
                    y = down_w @ self.act_fn(up_w @ hidden_states[t])
                    out[t] = out[t] + top_k_weights[t, j] * y
            return out

    return NoGateExperts(None)  # no config: the test calls both forwards directly


@pytest.mark.parametrize(
    ("act", "fused"),
    [("relu2", "relu2"), ("silu", "silu"), ("gelu", "gelu"), ("relu", "relu"), ("gelu_pytorch_tanh", None)],
)
@pytest.mark.parametrize("transposed", [False, True])
def test_cpu_no_gate_experts_plan_and_equal_their_own_forward(act, fused, transposed):
    """`plan_experts` recognises a no-gate module's `act_fn` by probing it (an act_fn none of the
    kernels' matches keeps the general path), and the "padd" forward equals the module's own,
    output and gradients."""
    from padd.moe.experts_plan import plan_experts
    from padd.moe.hf_experts import padd_experts_forward

    experts = _no_gate_experts(act, transposed)
    plan = plan_experts(experts)
    assert (plan.activation.name if plan.fused else None) == fused, plan.why
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 12, generator=g)
    ids = torch.rand(9, 4, generator=g).topk(2, dim=1).indices
    weights = torch.rand(9, 2, generator=g).requires_grad_()
    grad = torch.randn(9, 12, generator=g)
    results = []
    own_forward = type(experts).forward.__wrapped__  # the class's own, under the dispatching wrapper
    for run in (own_forward, padd_experts_forward):
        leaves = [x.clone().requires_grad_(), weights, experts.up_proj, experts.down_proj]
        out = run(experts, leaves[0], ids, weights)
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for label, a, b in zip(["x", "weights", "up_proj", "down_proj"], got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=label)


_SM90_COMPILE = (
    GROUPED_GEMM_SM90_PRELUDE
    + """
tile = dict(BLOCK_E=8, DOT_PRECISION="tf32", BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, TOP_K=2)
for name, code in gt._ACTIVATION_CODES.items():
    act = dict(ACTIVATION=code, GATE_STEP=1, GATED=code < gt._FIRST_UNGATED, HAS_BIAS=False)
    compile_sm90(gt._gate_up_swiglu_kernel.fn, {**act, **tile}, warps=4)
    compile_sm90(gt._swiglu_backward_kernel.fn, {**act, **tile}, warps=4)
print("compiled")
"""
)


def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter skips Triton's code generator: lower the gate/up and backward kernels of
    every activation, gated and not, to sm_90 offline (bf16)."""
    assert_compiles_offline_for_sm90(_SM90_COMPILE)
