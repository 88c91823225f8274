"""Sigmoid routing with a selection bias picks what DeepSeek-V3 picks: top-k of
`sigmoid(logits) + bias` (transformers' `e_score_correction_bias`), weights from the unbiased
sigmoid scores. Softmax keeps the bias on the logits."""

import pytest
import torch
from padd.kernels import route


def _draw(gen, *shape, kind="randn"):
    """Seeded draws from a CPU generator, moved to the default device (CUDA on a GPU machine,
    see conftest.py): a CPU generator cannot draw CUDA tensors."""
    draw = torch.randn if kind == "randn" else torch.rand
    return draw(*shape, generator=gen, device="cpu").to(torch.get_default_device())


def _deepseek_v3_reference(logits, bias, k):
    """DeepSeek-V3's selection without groups, written out independently."""
    scores = torch.sigmoid(logits.float())
    chosen = torch.topk(scores + bias, k, dim=-1, sorted=True).indices
    weights = scores.gather(1, chosen)
    return chosen, weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sigmoid_bias_selects_like_deepseek_v3(backend):
    gen = torch.Generator().manual_seed(0)
    logits = _draw(gen, 37, 16) * 3
    # A bias of the scores' scale: adding it to the logits instead would choose differently.
    bias = _draw(gen, 16, kind="rand") * 0.5
    r = route(logits, 4, score="sigmoid", selection_bias=bias, backend=backend)
    want_e, want_w = _deepseek_v3_reference(logits, bias, 4)
    got_e = r.expert_ids.long()
    assert torch.equal(torch.sort(got_e, 1).values, torch.sort(want_e, 1).values)
    order = torch.argsort(got_e, 1)
    torch.testing.assert_close(r.weights.gather(1, order), want_w.gather(1, torch.argsort(want_e, 1)))
    on_logits = torch.topk(logits + bias, 4, dim=-1).indices
    assert not torch.equal(torch.sort(on_logits, 1).values, torch.sort(want_e, 1).values)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_softmax_bias_stays_on_the_logits(backend):
    gen = torch.Generator().manual_seed(1)
    logits = _draw(gen, 29, 8)
    bias = _draw(gen, 8)
    r = route(logits, 2, score="softmax", selection_bias=bias, backend=backend)
    want = torch.topk(logits + bias, 2, dim=-1).indices
    assert torch.equal(torch.sort(r.expert_ids.long(), 1).values, torch.sort(want, 1).values)
