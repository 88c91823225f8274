"""Zero-computation experts (LongCat-Flash): `padd.MoE(num_zero_experts=Z)` scores E + Z slots,
and a pick of slot E + j adds the token's input times its weight instead of an expert's output.
Checked against a per-token loop written from that definition, and `MoE.from_hf` against
LongCat-Flash's own block (with zero slots actually picked); a router whose extra slots are not
identity experts stays refused in one line."""

import pytest
import torch
from hf_families import build_tiny_model, discover_families, inflate_expert_weights, randomize_routing_knobs

from padd import MoE


def _loop_oracle(moe: MoE, x_TH: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_j w_tj · (x_t if id_tj >= E else down_e(silu(gate_e x_t) · up_e x_t))."""
    routing = moe.last_routing
    gate_up, down = moe.expert_weights()
    inter = moe.intermediate_size
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for e, w in zip(routing.expert_ids[t].tolist(), routing.weights[t], strict=True):
            if e >= moe.num_experts:
                out[t] += w * x_TH[t]
                continue
            h = gate_up[e] @ x_TH[t]
            out[t] += w * (down[e] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    return out


def test_zero_experts_add_the_weighted_input():
    torch.manual_seed(0)
    E, Z, H = 4, 2, 16
    moe = MoE(H, 8, num_experts=E, top_k=2, num_zero_experts=Z, use_selection_bias=True)
    assert moe.gate.weight.shape == (E + Z, H) and moe.selection_bias.shape == (E + Z,)
    with torch.no_grad():  # zero slots big enough to win for a good share of the tokens
        moe.gate.weight[E:] *= 3
    x = torch.randn(40, H)
    y = moe(x)
    ids = moe.last_routing.expert_ids
    both_zero = (ids >= E).all(dim=1)
    assert (ids >= E).any(dim=1).sum() >= 5 and both_zero.any() and (~(ids >= E)).all(dim=1).any()
    torch.testing.assert_close(y, _loop_oracle(moe, x), rtol=1e-5, atol=1e-5)
    # A token whose every pick is a zero slot gets exactly its input times the summed weights.
    t = int(both_zero.nonzero()[0])
    torch.testing.assert_close(y[t], x[t] * moe.last_routing.weights[t].sum(), rtol=1e-6, atol=1e-6)


def test_zero_experts_gradient_reaches_the_router_through_the_identity_slots():
    torch.manual_seed(1)
    moe = MoE(16, 8, num_experts=4, top_k=2, num_zero_experts=2, norm_topk_prob=True)
    with torch.no_grad():
        moe.gate.weight[4:] *= 3
    x = torch.randn(30, 16, requires_grad=True)
    grad = torch.randn(30, 16)
    got = torch.autograd.grad((moe(x) * grad).sum(), [x, moe.gate.weight])
    moe(x)  # a fresh routing graph for the oracle's weights to differentiate through
    assert (moe.last_routing.expert_ids >= 4).any()
    want = torch.autograd.grad((_loop_oracle(moe, x) * grad).sum(), [x, moe.gate.weight])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_num_zero_experts_is_checked(bad):
    with pytest.raises(ValueError, match="num_zero_experts"):
        MoE(16, 8, num_experts=4, top_k=2, num_zero_experts=bad)


def _family_block(model_type: str, class_name: str) -> torch.nn.Module:
    family = next((f for f in discover_families() if f.model_type == model_type), None)
    if family is None:
        pytest.skip(f"this transformers has no {model_type}")
    model = build_tiny_model(family, seed=0).eval()
    inflate_expert_weights(model)
    block = next(m for m in model.modules() if type(m).__name__ == class_name)
    randomize_routing_knobs(block)
    return block


def test_from_hf_converts_longcat_flash_with_its_zero_experts_picked():
    block = _family_block("longcat_flash", "LongcatFlashMoE")
    moe = MoE.from_hf(block)
    assert moe.num_zero_experts == block.zero_expert_num > 0
    x = torch.randn(4, 16, moe.hidden_size, generator=torch.Generator().manual_seed(5)) * 4
    with torch.no_grad():
        want, got = block(x), moe(x)
    picked_zero = (moe.last_routing.expert_ids >= moe.num_experts).any(dim=1)
    assert picked_zero.any() and not picked_zero.all()  # both kinds of token in the check
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_from_hf_still_refuses_extra_slots_that_are_not_zero_experts():
    block = _family_block("inkling_mm_model", "InklingMoE")
    with pytest.raises(NotImplementedError, match=r"scores 9 slots for 8 experts"):
        MoE.from_hf(block)
