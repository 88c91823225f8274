"""padd.MoE against an independent per-token dense loop; from_hf; compile; FLOP counts; errors."""

import pytest
import torch
import torch.nn.functional as F
from moe_tiny_models import tiny_model
from torch.utils.flop_counter import FlopCounterMode

from padd import MoE


def dense_oracle(moe: MoE, x: torch.Tensor, experts_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loop in fp64: score every expert, pick top-k by `logits + bias` (ties -> lower id),
    weight from the unbiased scores, run each chosen expert's SwiGLU densely. Differentiable."""
    H, I, E, K = moe.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k
    w_router = moe.gate.weight.double()
    w13, w2 = moe.gate_up_proj.double(), moe.down_proj.double()
    bias = (
        moe.selection_bias.double() if moe.selection_bias is not None else torch.zeros(E, dtype=torch.float64)
    )
    rows = []
    for t, x_t in enumerate(x.reshape(-1, H).double()):
        logits = w_router @ x_t
        scores = torch.softmax(logits, -1) if moe.score == "softmax" else torch.sigmoid(logits)
        if experts_TK is None:
            key = (logits + bias).tolist()
            chosen = sorted(range(E), key=lambda e: (-key[e], e))[:K]
        else:
            chosen = experts_TK[t].tolist()
        weights = torch.stack([scores[e] for e in chosen])
        if moe.norm_topk_prob:
            weights = weights / weights.sum()
        y_t = torch.zeros(H, dtype=torch.float64)
        for w, e in zip(weights, chosen, strict=True):
            gate, up = w13[e, :I] @ x_t, w13[e, I:] @ x_t
            y_t = y_t + w * (w2[e] @ (F.silu(gate) * up))
        rows.append(y_t)
    return torch.stack(rows).reshape(x.shape) if rows else x.double() * 0.0


def _grads(moe: MoE, x: torch.Tensor) -> list[torch.Tensor]:
    return [x.grad, moe.gate.weight.grad, moe.gate_up_proj.grad, moe.down_proj.grad]


def _zero(moe: MoE, x: torch.Tensor) -> None:
    moe.zero_grad(set_to_none=True)
    x.grad = None


CASES = [
    # (shape of x, E, K, score, norm_topk_prob)
    ((2, 3, 16), 6, 2, "softmax", True),
    ((7, 16), 5, 1, "softmax", False),
    ((1, 16), 4, 4, "softmax", True),  # k = E, T = 1
    ((2, 5, 16), 7, 3, "sigmoid", True),
    ((9, 16), 8, 2, "sigmoid", False),
]


@pytest.mark.parametrize(("shape", "E", "K", "score", "norm"), CASES)
def test_forward_backward_matches_dense_oracle(shape, E, K, score, norm):
    moe = MoE(16, 12, E, K, score=score, norm_topk_prob=norm)
    x = torch.randn(*shape, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    got = _grads(moe, x)
    _zero(moe, x)
    ref = dense_oracle(moe, x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    ref.backward(grad_out.double())
    for name, g, r in zip(("x", "router", "gate_up_proj", "down_proj"), got, _grads(moe, x), strict=True):
        torch.testing.assert_close(g, r.float(), rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_forward_close_to_oracle():
    moe = MoE(32, 16, 6, 2).to(torch.bfloat16)
    x = torch.randn(3, 4, 32, dtype=torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16
    # Same decisions as the layer (bf16 logits may flip near-ties); checks the expert math in bf16.
    ref = dense_oracle(moe, x, experts_TK=moe.last_routing.expert_ids)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)


def test_empty_input():
    moe = MoE(16, 8, 4, 2)
    y = moe(torch.randn(0, 16))
    assert y.shape == (0, 16)
    assert moe.aux_loss.item() == 0.0 and moe.z_loss.item() == 0.0


def test_selection_bias_changes_selection_not_weights():
    moe = MoE(16, 8, 6, 2, use_selection_bias=True)
    assert moe.selection_bias.dtype == torch.float32 and "selection_bias" in moe.state_dict()
    x = torch.randn(10, 16)
    moe(x)
    unbiased = moe.last_routing
    moe.selection_bias[3] = 50.0
    y = moe(x)
    biased = moe.last_routing
    assert (biased.expert_ids[:, 0] == 3).all()
    assert not torch.equal(biased.expert_ids, unbiased.expert_ids)
    probs_TE = torch.softmax(moe.last_router_logits.float(), -1)
    chosen = probs_TE.gather(1, biased.expert_ids.long())
    torch.testing.assert_close(biased.weights, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(y.double(), dense_oracle(moe, x), rtol=1e-5, atol=1e-6)


def test_aux_and_z_loss_of_last_call():
    moe = MoE(16, 8, 5, 2)
    x = torch.randn(11, 16)
    moe(x)
    logits = moe.last_router_logits
    assert logits.shape == (11, 5) and logits.requires_grad
    probs = torch.softmax(logits, -1)
    counts = torch.bincount(moe.last_routing.expert_ids.reshape(-1).long(), minlength=5).float()
    expected_aux = 5 * torch.sum(counts / (11 * 2) * probs.mean(0))
    torch.testing.assert_close(moe.aux_loss, expected_aux)
    torch.testing.assert_close(moe.z_loss, torch.logsumexp(logits, -1).square().mean())
    moe.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    sig = MoE(16, 8, 5, 2, score="sigmoid")
    sig(x)
    torch.testing.assert_close(sig.z_loss, torch.logsumexp(sig.last_router_logits, -1).square().mean())


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_from_hf_shares_weights_and_matches_block(arch):
    model = tiny_model(arch)
    model.set_experts_implementation("eager")
    block = model.model.layers[0].mlp
    moe = MoE.from_hf(block)
    assert moe.gate.weight is block.gate.weight
    assert moe.gate_up_proj is block.experts.gate_up_proj and moe.down_proj is block.experts.down_proj
    assert moe.norm_topk_prob == (arch != "olmoe") and moe.top_k == block.gate.top_k
    x = torch.randn(2, 5, 32)
    grad_out = torch.randn(2, 5, 32)
    ref = block(x)
    (ref * grad_out).sum().backward()
    ref_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    y = moe(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    (y * grad_out).sum().backward()
    for g, r in zip((p.grad for p in block.parameters()), ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_from_hf_qwen2_moe_shared_expert():
    block = tiny_model("qwen2_moe").model.layers[0].mlp
    whole = MoE.from_hf(block)  # the sigmoid-gated shared expert is part of the result
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(whole(x), block(x), rtol=1e-5, atol=1e-6)
    moe = MoE.from_hf(block, routed_experts_only=True)
    h = torch.randn(6, 32)
    _, weights, experts = block.gate(h)
    torch.testing.assert_close(moe(h), block.experts(h, experts, weights), rtol=1e-5, atol=1e-6)


def test_from_hf_with_selection_bias():
    block = tiny_model("mixtral").model.layers[1].mlp
    moe = MoE.from_hf(block, use_selection_bias=True)
    assert moe.selection_bias.device.type == "cpu" and torch.equal(moe.selection_bias, torch.zeros(6))
    moe.selection_bias[2] = 50.0
    moe(torch.randn(4, 32))
    assert (moe.last_routing.expert_ids[:, 0] == 2).all()


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    moe = MoE(16, 8, 6, 2, use_selection_bias=True)
    x = torch.randn(2, 6, 16, requires_grad=True)
    grad_out = torch.randn(2, 6, 16)
    y_ref = moe(x)
    y_ref.backward(grad_out)
    ref = [g.clone() for g in _grads(moe, x)]
    _zero(moe, x)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, y_ref)
    y.backward(grad_out)
    for g, r in zip(_grads(moe, x), ref, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph_inference():
    torch._dynamo.reset()
    moe = MoE(16, 8, 6, 2)
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(moe, fullgraph=True)(x), moe(x))


def test_flop_counter_counts_expert_gemms_and_router():
    T, H, I, E, K = 12, 16, 8, 6, 2
    moe = MoE(H, I, E, K)
    with FlopCounterMode(display=False) as counter:
        moe(torch.randn(T, H))
    assert counter.get_total_flops() == 2 * T * K * H * 3 * I + 2 * T * H * E


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="top_k=5 must be <= num_experts=4"):
        MoE(16, 8, 4, 5)
    with pytest.raises(ValueError, match="hidden_size must be >= 1"):
        MoE(0, 8, 4, 2)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        MoE(16, 8, 4, 0)
    with pytest.raises(TypeError, match="intermediate_size must be an int"):
        MoE(16, 8.0, 4, 2)
    with pytest.raises(ValueError, match="score must be one of"):
        MoE(16, 8, 4, 2, score="relu")
    moe = MoE(16, 8, 4, 2)
    with pytest.raises(RuntimeError, match="no forward has run yet"):
        _ = moe.aux_loss
    with pytest.raises(ValueError, match=r"\[\.\.\., H=16\]"):
        moe(torch.randn(3, 15))
    with pytest.raises(TypeError, match="!= parameter dtype"):
        moe(torch.randn(3, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        moe(torch.ones(3, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        MoE(16, 8, 4, 2, dtype=torch.float64)(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        moe([[0.0] * 16])
    with pytest.raises(TypeError, match="not a transformers sparse MoE block"):
        MoE.from_hf(torch.nn.Linear(4, 4))


def test_group_and_activation_errors_before_any_compute():
    with pytest.raises(ValueError, match="n_group and topk_group go together"):
        MoE(16, 8, 8, 2, n_group=4)
    with pytest.raises(ValueError, match="n_group=3 must divide num_experts=8"):
        MoE(16, 8, 8, 2, n_group=3, topk_group=1)
    with pytest.raises(ValueError, match=r"topk_group=5 must lie in \[1, n_group=4\]"):
        MoE(16, 8, 8, 2, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="top_k=3 exceeds the experts of the topk_group=1 groups kept"):
        MoE(16, 8, 8, 3, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="activation must be one of"):
        MoE(16, 8, 8, 2, activation="relu2")


def test_group_limited_routing_picks_only_from_the_best_groups():
    """Hand-made logits: groups {0,1} {2,3} {4,5} {6,7}; with topk_group=1 a token whose single
    best expert sits in a weak group must still route inside the strongest group."""
    moe = MoE(4, 2, 8, 2, score="sigmoid", n_group=4, topk_group=1, routed_scaling_factor=2.0)
    logits = torch.tensor([[0.0, 0.0, 3.0, 3.0, 0.0, 9.0, 0.0, 0.0]])  # group scores: 1.0, 1.9, 1.5, 1.0
    routing = moe._route(logits)
    assert sorted(routing.expert_ids[0].tolist()) == [2, 3]
    torch.testing.assert_close(routing.weights, torch.full((1, 2), 1.0))  # renormalised, then × 2
