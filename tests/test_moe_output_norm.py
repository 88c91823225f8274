"""`padd.MoE`'s `output_norm`: a norm of the layer's output (routed plus shared experts), as
A.X-K1's `post_mlp_layernorm`. `MoE.from_hf` holds such a norm only where the block's own forward
shows it is applied to the output; a norm applied anywhere else, or one that cannot be verified,
is refused in one line naming it."""

import types

import pytest
import torch
from hf_families import build_tiny_model, discover_families, inflate_expert_weights, randomize_block_norms

from padd import MoE


def test_output_norm_normalises_the_sum_of_routed_and_shared_experts():
    torch.manual_seed(0)
    shared = torch.nn.Linear(16, 16, bias=False)
    norm = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    moe = MoE(16, 8, num_experts=4, top_k=2, shared_experts=shared, output_norm=norm)
    bare = MoE(16, 8, num_experts=4, top_k=2)
    bare.load_state_dict({k: v for k, v in moe.state_dict().items() if k in bare.state_dict()})
    x = torch.randn(2, 5, 16) * 3
    want = norm(bare(x) + shared(x))  # the oracle: the same routed layer, then shared, then norm
    torch.testing.assert_close(moe(x), want, rtol=0, atol=0)
    assert "output_norm.weight" in moe.state_dict()


def _axk1_block() -> torch.nn.Module:
    family = next((f for f in discover_families() if f.model_type == "axk1"), None)
    if family is None:
        pytest.skip("this transformers has no A.X-K1")
    model = build_tiny_model(family, seed=0).eval()
    inflate_expert_weights(model)
    block = next(m for m in model.modules() if type(m).__name__ == "AXK1MoE")
    randomize_block_norms(block)
    return block


def test_from_hf_holds_axk1s_post_norm_and_equals_the_block():
    block = _axk1_block()
    moe = MoE.from_hf(block)
    assert moe.output_norm is block.post_mlp_layernorm  # shared, not copied
    x = torch.randn(3, 7, moe.hidden_size, generator=torch.Generator().manual_seed(3)) * 4
    with torch.no_grad():
        want, got = block(x), moe(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_from_hf_refuses_a_norm_the_block_applies_elsewhere():
    block = _axk1_block()
    original = type(block).forward

    def norm_first(self, hidden_states):  # the same modules, the norm on the input instead
        return original(self, self.post_mlp_layernorm(hidden_states))

    block.forward = types.MethodType(norm_first, block)
    with pytest.raises(
        NotImplementedError, match=r"no place for its post_mlp_layernorm: taken as padd .*differs"
    ):
        MoE.from_hf(block)


@pytest.mark.parametrize("options", [{"verify": False}, {"routed_experts_only": True}])
def test_from_hf_refuses_a_norm_it_cannot_hold_exactly(options):
    """Unverified, the norm's place is unknown; without the shared experts, it would normalise
    another sum than the block's."""
    with pytest.raises(NotImplementedError, match="no place for its post_mlp_layernorm"):
        MoE.from_hf(_axk1_block(), **options)
