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
        MoE(16, 8, 8, 2, activation="relu3")


def test_group_limited_routing_picks_only_from_the_best_groups():
    """Hand-made logits: groups {0,1} {2,3} {4,5} {6,7}; with topk_group=1 a token whose single
    best expert sits in a weak group must still route inside the strongest group."""
    moe = MoE(4, 2, 8, 2, score="sigmoid", n_group=4, topk_group=1, routed_scaling_factor=2.0)
    logits = torch.tensor([[0.0, 0.0, 3.0, 3.0, 0.0, 9.0, 0.0, 0.0]])  # group scores: 1.0, 1.9, 1.5, 1.0
    routing = moe._route(logits)
    assert sorted(routing.expert_ids[0].tolist()) == [2, 3]
    torch.testing.assert_close(routing.weights, torch.full((1, 2), 1.0))  # renormalised, then × 2


def gpt_oss_oracle(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's block written out per token in fp64 from its published math: biased router,
    softmax over the top-k logits, transposed `[E, H, 2I]` experts with interleaved gate/up rows
    and biases, `(clamp(up, ±L) + 1) · g·σ(α g)` with `g = min(gate, L)`."""
    L, alpha = moe.activation.limit, moe.activation.alpha
    w_r, b_r = moe.gate.weight.double(), moe.gate.bias.double()
    w1, b1 = moe.gate_up_proj.double(), moe.gate_up_proj_bias.double()  # [E, H, 2I], [E, 2I]
    w2, b2 = moe.down_proj.double(), moe.down_proj_bias.double()  # [E, I, H], [E, H]
    rows = []
    for x_t in x.reshape(-1, moe.hidden_size).double():
        top_logits, chosen = torch.topk(w_r @ x_t + b_r, moe.top_k)
        weights = torch.softmax(top_logits, -1)
        y_t = torch.zeros(moe.hidden_size, dtype=torch.float64)
        for w, e in zip(weights, chosen.tolist(), strict=True):
            gate_up = x_t @ w1[e] + b1[e]
            gate, up = gate_up[0::2].clamp(max=L), gate_up[1::2].clamp(-L, L)
            h = (up + 1) * gate * torch.sigmoid(alpha * gate)
            y_t = y_t + w * (h @ w2[e] + b2[e])
        rows.append(y_t)
    return torch.stack(rows).reshape(x.shape)


def test_transposed_biased_interleaved_experts_match_gpt_oss_oracle():
    torch.manual_seed(0)
    moe = MoE(
        16, 8, 6, 2, activation="gpt_oss", limit=7.0, alpha=1.702, gate_up_interleaved=True,
        transposed=True, expert_bias=True, router_bias=True,
    )  # fmt: skip
    assert moe.gate_up_proj.shape == (6, 16, 16) and moe.down_proj.shape == (6, 8, 16)
    assert moe.gate_up_proj_bias.shape == (6, 16) and moe.down_proj_bias.shape == (6, 16)
    with torch.no_grad():  # weights large enough that the clamps act; non-zero biases
        moe.gate_up_proj.mul_(20.0)
        for bias in (moe.gate.bias, moe.gate_up_proj_bias, moe.down_proj_bias):
            bias.normal_(0, 0.5)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y = moe(x)
    ref = gpt_oss_oracle(moe, x)
    pre = (x.detach().reshape(-1, 16) @ moe.gate_up_proj.detach()[0]).abs().max()
    assert pre > 7.0, "the clamp never acted"
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(y)
    params = [x, moe.gate.weight, moe.gate.bias, moe.gate_up_proj, moe.gate_up_proj_bias, moe.down_proj_bias]
    got = torch.autograd.grad((y * grad_out).sum(), params)
    want = torch.autograd.grad((ref * grad_out.double()).sum(), params)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-4)


def _routing_of(moe: MoE, logits: list[list[float]]) -> tuple[list[list[int]], torch.Tensor]:
    routing = moe._route(torch.tensor(logits))
    return [sorted(row) for row in routing.expert_ids.tolist()], routing.weights


def test_selection_bias_on_scores_or_logits():
    """Hand-made logits where adding the bias to the softmax probabilities (Ernie-4.5, LongCat)
    and to the logits pick different experts; and sigmoid with the bias on the logits (Kolibri)."""
    logits = [[4.0, 3.0, 0.0, -1.0]]  # probs ≈ 0.71, 0.26, 0.013, 0.005
    moe = MoE(4, 2, 4, 2, use_selection_bias=True)
    moe.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.0]))
    assert _routing_of(moe, logits)[0] == [[0, 1]]  # default for softmax: logits + 0.5 changes nothing
    moe.selection_bias_on = "scores"
    ids, weights = _routing_of(moe, logits)
    assert ids == [[0, 2]]  # 0.013 + 0.5 beats 0.26
    probs = torch.softmax(torch.tensor(logits[0]), -1)
    torch.testing.assert_close(weights.sort(descending=True)[0][0], probs[[0, 2]] / probs[[0, 2]].sum())
    sig = MoE(4, 2, 4, 2, score="sigmoid", norm_topk_prob=False, use_selection_bias=True)
    sig.selection_bias.copy_(torch.tensor([0.0, 0.0, 3.5, 0.0]))
    logits = [[9.0, 8.0, 5.0, 0.0]]  # sigmoid scores ≈ 1.0, 1.0, 0.993, 0.5
    assert _routing_of(sig, logits)[0] == [[0, 2]]  # default for sigmoid: scores + 3.5
    sig.selection_bias.copy_(torch.tensor([0.0, 0.0, 3.5, 0.0]))
    sig.selection_bias_on = "logits"
    assert _routing_of(sig, logits)[0] == [[0, 2]]  # 5 + 3.5 = 8.5 beats 8
    sig.selection_bias.copy_(torch.tensor([0.0, 0.0, 2.5, 0.0]))
    ids, weights = _routing_of(sig, logits)
    assert ids == [[0, 1]]  # 7.5 < 8 on the logits, although 0.993 + 2.5 would win on the scores
    torch.testing.assert_close(weights.sort(descending=True)[0][0], torch.sigmoid(torch.tensor([9.0, 8.0])))


def test_max_scored_groups_and_logit_softcap():
    # Groups {0,1} {2,3} {4,5} {6,7}; "max" keeps the group of the single best expert (group 2),
    # "top2_sum" the group with the best pair (group 1).
    logits = [[0.0, 0.0, 3.5, 3.5, 0.0, 4.0, 0.0, 0.0]]
    by_max = MoE(4, 2, 8, 2, n_group=4, topk_group=1, group_score="max", norm_topk_prob=False)
    ids, weights = _routing_of(by_max, logits)
    assert ids == [[4, 5]]
    probs = torch.softmax(torch.tensor(logits[0]), -1)
    torch.testing.assert_close(weights[0].sort()[0], probs[[4, 5]].sort()[0])  # not renormalised
    by_pairs = MoE(4, 2, 8, 2, n_group=4, topk_group=1, group_score="top2_sum")
    assert _routing_of(by_pairs, logits)[0] == [[2, 3]]
    capped = MoE(4, 2, 3, 2, router_logit_softcap=2.0, norm_topk_prob=False)
    raw = torch.tensor([[5.0, 1.0, -3.0]])
    ids, weights = _routing_of(capped, raw.tolist())
    want = torch.softmax(2.0 * torch.tanh(raw / 2.0), -1)[0, :2]
    assert ids == [[0, 1]]
    torch.testing.assert_close(weights[0].sort(descending=True)[0], want)


def test_from_hf_deepseek_v2_group_limited_greedy():
    """DeepSeek-V2's `group_limited_greedy` (groups scored by their best softmax probability,
    no renormalisation, scaled) against transformers' own block."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    torch.manual_seed(0)
    config = DeepseekV2Config(
        hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", n_shared_experts=1, routed_scaling_factor=1.7,
    )  # fmt: skip
    block = DeepseekV2Moe(config).eval()
    with torch.no_grad():
        for param in (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj):
            param.normal_(0, 0.3)
    moe = MoE.from_hf(block)
    assert (moe.n_group, moe.topk_group, moe.group_score) == (4, 2, "max")
    assert moe.routed_scaling_factor == 1.7 and not moe.norm_topk_prob
    x = torch.randn(3, 6, 32) * 3
    torch.testing.assert_close(moe(x), block(x), rtol=1e-5, atol=1e-5)


def test_from_hf_refusals_are_one_line():
    block = tiny_model("mixtral").model.layers[0].mlp
    block.post_norm = torch.nn.LayerNorm(32)  # a module padd.MoE has no place for
    with pytest.raises(
        NotImplementedError, match=r"MixtralSparseMoeBlock: padd.MoE has no place for its post_norm"
    ):
        MoE.from_hf(block)
    del block.post_norm
    block.gate.weight = torch.nn.Parameter(torch.randn(7, 32))  # 7 slots for 6 experts
    with pytest.raises(NotImplementedError, match="router scores 7 slots for 6 experts"):
        MoE.from_hf(block)


def test_new_option_errors_name_the_argument():
    with pytest.raises(ValueError, match="selection_bias_on must be None or one of"):
        MoE(16, 8, 4, 2, selection_bias_on="bias")
    with pytest.raises(ValueError, match="router_logit_softcap must be None or a number > 0"):
        MoE(16, 8, 4, 2, router_logit_softcap=0.0)
    with pytest.raises(ValueError, match="group_score must be one of"):
        MoE(16, 8, 8, 2, n_group=4, topk_group=2, group_score="mean")
    with pytest.raises(ValueError, match="selection_bias_on='logits' does not go with n_group"):
        MoE(16, 8, 8, 2, n_group=4, topk_group=2, selection_bias_on="logits")
    with pytest.raises(TypeError, match="transposed must be a bool"):
        MoE(16, 8, 4, 2, transposed="yes")
    with pytest.raises(TypeError, match="routed_scaling_factor must be a number"):
        MoE(16, 8, 4, 2, routed_scaling_factor="2")


_UNGATED = {
    "relu2": lambda u: torch.relu(u).square(),
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": lambda u: F.gelu(u),  # the exact (erf) form, transformers' ACT2FN["gelu"]
}


def ungated_oracle(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Non-gated experts written out per token in fp64: softmax or sigmoid top-k (ties -> lower
    id), `down_e(act(up_e x_t + b_e)) + b'_e` with the up projection alone, read from `up_proj`
    as stored (`[E, I, H]`, or `[E, H, I]` transposed). Differentiable."""
    H, E, K = moe.hidden_size, moe.num_experts, moe.top_k
    act = _UNGATED[moe.activation.name]
    w_r = moe.gate.weight.double()
    w1, w2 = moe.up_proj.double(), moe.down_proj.double()
    if moe.transposed:
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)  # back to [E, I, H] / [E, H, I]
    b1 = moe.up_proj_bias.double() if moe.up_proj_bias is not None else torch.zeros(w1.shape[:2]).double()
    b2 = moe.down_proj_bias.double() if moe.down_proj_bias is not None else torch.zeros(E, H).double()
    rows = []
    for x_t in x.reshape(-1, H).double():
        logits = w_r @ x_t
        scores = torch.softmax(logits, -1) if moe.score == "softmax" else torch.sigmoid(logits)
        key = logits.tolist()
        chosen = sorted(range(E), key=lambda e: (-key[e], e))[:K]
        weights = torch.stack([scores[e] for e in chosen])
        if moe.norm_topk_prob:
            weights = weights / weights.sum()
        y_t = torch.zeros(H, dtype=torch.float64)
        for w, e in zip(weights, chosen, strict=True):
            y_t = y_t + w * (w2[e] @ act(w1[e] @ x_t + b1[e]) + b2[e])
        rows.append(y_t)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize(
    ("activation", "score", "transposed", "expert_bias"),
    [
        ("relu2", "softmax", False, False),
        ("relu2", "sigmoid", True, False),  # Ergo's stored layout
        ("relu2", "softmax", False, True),
        ("relu", "sigmoid", False, False),
        ("silu", "softmax", True, True),
        ("gelu", "softmax", False, False),
    ],
)
def test_ungated_experts_match_per_token_oracle(activation, score, transposed, expert_bias):
    """`activation="relu2"` (and the other non-gated ones): `up_proj [E, I, H]` alone, forward
    and every gradient (input, router, up, down, biases) against the fp64 per-token oracle."""
    torch.manual_seed(0)
    E, H, I = 6, 16, 12
    moe = MoE(H, I, E, 2, score=score, activation=activation, transposed=transposed, expert_bias=expert_bias)
    up_shape = (E, H, I) if transposed else (E, I, H)
    assert moe.up_proj.shape == up_shape and moe.down_proj.shape == ((E, I, H) if transposed else (E, H, I))
    assert not moe.gated and not hasattr(moe, "gate_up_proj") and not hasattr(moe, "gate_up_proj_bias")
    assert moe.expert_weights()[0].shape == (E, I, H)
    if expert_bias:
        assert moe.up_proj_bias.shape == (E, I) and moe.down_proj_bias.shape == (E, H)
        with torch.no_grad():
            moe.up_proj_bias.normal_(0, 0.5)
            moe.down_proj_bias.normal_(0, 0.5)
    else:
        assert moe.up_proj_bias is None and moe.down_proj_bias is None
    x = torch.randn(3, 5, H, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = ungated_oracle(moe, x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    params = [x, *(p for p in moe.parameters())]
    assert len(params) == 4 + 2 * expert_bias  # x, router, up_proj, down_proj (+ biases)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad((y * grad_out).sum(), params)
    want = torch.autograd.grad((ref * grad_out.double()).sum(), params)
    names = ["x", *(n for n, _ in moe.named_parameters())]
    for name, g, r in zip(names, got, want, strict=True):
        torch.testing.assert_close(
            g.double(), r.double(), rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_ungated_flops_and_state_dict_names():
    T, H, I, E, K = 12, 16, 8, 6, 2
    moe = MoE(H, I, E, K, activation="relu2")
    assert set(moe.state_dict()) == {"gate.weight", "up_proj", "down_proj"}
    with FlopCounterMode(display=False) as counter:
        moe(torch.randn(T, H))
    assert counter.get_total_flops() == 2 * T * K * H * 2 * I + 2 * T * H * E  # up and down GEMMs
    assert "activation='relu2'" in repr(moe)


def test_ungated_activation_errors_name_the_argument_before_compute():
    with pytest.raises(ValueError, match="activation='relu2' \\(no gate\\) takes no limit or alpha"):
        MoE(16, 8, 4, 2, activation="relu2", limit=7.0)
    with pytest.raises(ValueError, match="takes no limit or alpha"):
        MoE(16, 8, 4, 2, activation="gelu", alpha=1.0)
    with pytest.raises(ValueError, match="gate_up_interleaved must be False"):
        MoE(16, 8, 4, 2, activation="relu2", gate_up_interleaved=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        MoE(16, 8, 4, 2, activation="relu²")


def _nemotron_h_block(**overrides):
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    config = NemotronHConfig(
        hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, moe_shared_expert_intermediate_size=16, routed_scaling_factor=1.5, **overrides,
    )  # fmt: skip
    block = NemotronHMoE(config).eval()
    with torch.no_grad():
        for param in (block.gate.weight, block.experts.up_proj, block.experts.down_proj):
            param.normal_(0, 0.3)
        block.gate.e_score_correction_bias.normal_(0, 0.1)
    return block


def test_from_hf_nemotron_h_relu2_experts():
    """Nemotron-H's block (sigmoid, correction bias, groups, scale, relu² experts with no gate,
    a shared MLP) converts sharing `up_proj`, and equals the block forward and backward."""
    block = _nemotron_h_block()
    moe = MoE.from_hf(block)
    assert moe.activation.name == "relu2" and moe.up_proj is block.experts.up_proj
    assert moe.down_proj is block.experts.down_proj and moe.shared_experts is block.shared_experts
    x = torch.randn(3, 6, 32) * 3
    grad_out = torch.randn_like(x)
    params = [block.gate.weight, block.experts.up_proj, block.experts.down_proj]
    want = block(x)
    want_grads = torch.autograd.grad((want * grad_out).sum(), params)
    got = moe(x)
    got_grads = torch.autograd.grad((got * grad_out).sum(), params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_from_hf_refuses_what_ungated_blocks_do_beyond_experts():
    with pytest.raises(
        NotImplementedError, match="NemotronHMoE: padd.MoE has no place for its fc1_latent_proj"
    ):
        MoE.from_hf(_nemotron_h_block(moe_latent_size=8))
    from transformers import ErgoConfig
    from transformers.models.ergo.modeling_ergo import ErgoMoE

    config = ErgoConfig(
        hidden_size=32,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        shared_intermediate_size=16,
    )
    with pytest.raises(
        NotImplementedError, match=r"ErgoMoE: its experts ErgoExperts .*post_expert_norm"
    ) as e:
        MoE.from_hf(ErgoMoE(config).eval())
    assert "\n" not in str(e.value)


def test_softcapped_swiglu_experts_match_inkling2_oracle():
    """`activation="swiglu_softcap"` (Inkling2): per token in fp64, `c_g·tanh(g/c_g) · σ(g) ·
    c_u·tanh(u/c_u)` with the caps passed by name, pre-activations several caps past both;
    forward, gradients, the gated FLOP count and the repr."""
    torch.manual_seed(0)
    T, H, I, E, K, c_g, c_u = 14, 16, 8, 6, 2, 1.5, 2.0
    moe = MoE(H, I, E, K, activation="swiglu_softcap", gate_softcap=c_g, up_softcap=c_u)
    assert moe.gate_up_proj.shape == (E, 2 * I, H)
    with torch.no_grad():
        moe.gate_up_proj.mul_(20.0)
    x = torch.randn(T, H, requires_grad=True)
    pre = (x.detach() @ moe.gate_up_proj.detach()[0].T).abs()
    assert (pre[:, :I] > 3 * c_g).double().mean() > 0.3 and (pre[:, I:] > 3 * c_u).double().mean() > 0.3
    y = moe(x)
    w1, w2, w_r = moe.gate_up_proj.double(), moe.down_proj.double(), moe.gate.weight.double()
    rows = []
    for x_t in x.double():
        top_logits, chosen = torch.topk(torch.softmax(w_r @ x_t, -1), K)
        weights = top_logits / top_logits.sum()
        y_t = torch.zeros(H, dtype=torch.float64)
        for w, e in zip(weights, chosen.tolist(), strict=True):
            gate, up = (w1[e] @ x_t).chunk(2)
            h = c_g * torch.tanh(gate / c_g) * torch.sigmoid(gate) * c_u * torch.tanh(up / c_u)
            y_t = y_t + w * (w2[e] @ h)
        rows.append(y_t)
    ref = torch.stack(rows)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(y)
    params = [x, moe.gate.weight, moe.gate_up_proj, moe.down_proj]
    got = torch.autograd.grad((y * grad_out).sum(), params)
    want = torch.autograd.grad((ref * grad_out.double()).sum(), params)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-5)
    with FlopCounterMode(display=False) as counter:
        moe(torch.randn(T, H))
    assert counter.get_total_flops() == 2 * T * K * H * 3 * I + 2 * T * H * E  # gate/up, down, router
    assert "activation='swiglu_softcap'" in repr(moe)
    with pytest.raises(ValueError, match="needs a finite positive up_softcap"):
        MoE(H, I, E, K, activation="swiglu_softcap", gate_softcap=c_g)
    with pytest.raises(ValueError, match="takes no limit or alpha"):
        MoE(H, I, E, K, activation="swiglu_softcap", gate_softcap=c_g, up_softcap=c_u, limit=7.0)
    with pytest.raises(ValueError, match="parameters of activation='swiglu_softcap' only"):
        MoE(H, I, E, K, gate_softcap=c_g)
