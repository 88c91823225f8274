"""`padd.MoE`'s zero-computation experts and output norm on the Triton kernels (bf16, CUDA), against
the same bf16 layer on the CPU reference: the stand-in slots at weight 0, the identity term and the
norm must survive the GPU path, forward and gradients. Both compute the router logits in bf16 from
fp32 sums, so they make the same picks (checked first). The CPU test runs the comparison itself on
two CPU copies."""

import copy

import pytest
import torch

from padd import MoE


def _layer_and_input() -> tuple[MoE, torch.Tensor]:
    torch.manual_seed(0)
    hidden, inter = 64, 32
    moe = MoE(
        hidden,
        inter,
        num_experts=8,
        top_k=2,
        num_zero_experts=2,
        use_selection_bias=True,
        shared_experts=torch.nn.Linear(hidden, hidden, bias=False),
        output_norm=torch.nn.RMSNorm(hidden, eps=1e-6),
    )
    with torch.no_grad():
        moe.gate.weight[8:] *= 2  # zero slots picked by a good share of the tokens
        moe.output_norm.weight.uniform_(0.5, 1.5)
        moe.selection_bias.normal_(0, 0.05)
    return moe, torch.randn(257, hidden)


def _fwd_bwd(moe: MoE, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    y = moe(x)
    params = [x, moe.gate.weight, moe.gate_up_proj, moe.down_proj]
    return [y, *torch.autograd.grad((y * grad).sum(), params)]


def _check(device: str, dtype: torch.dtype, atol: float) -> None:
    want_moe, x = _layer_and_input()
    want_moe = want_moe.to(dtype)
    got_moe = copy.deepcopy(want_moe).to(device)
    x, grad = x.to(dtype), torch.randn_like(x).to(dtype)
    want = _fwd_bwd(want_moe, x, grad)
    got = _fwd_bwd(got_moe, x.to(device), grad.to(device))
    # The same decisions first: a routing flip would make every comparison below meaningless.
    picks = want_moe.last_routing.expert_ids
    assert torch.equal(got_moe.last_routing.expert_ids.cpu(), picks)
    assert (picks >= 8).any() and (picks < 8).any()
    for g, w in zip(got, want, strict=True):
        w = w.float()
        assert (g.float().cpu() - w).abs().max() <= atol * w.abs().max()


def test_zero_experts_and_output_norm_helper_on_cpu():
    _check("cpu", torch.float32, 0.0)


@pytest.mark.gpu
def test_zero_experts_and_output_norm_bf16_on_the_triton_kernels():
    _check("cuda", torch.bfloat16, 5e-2)
