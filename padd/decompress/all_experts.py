"""Evaluate an MoE student with every expert active at a fixed weight (forward hooks only).

With experts that partition the teacher's neurons (`decompress(..., fill=False,
rescale="none")`), all experts at weight 1 compute exactly the teacher's FFN: the
function-preservation check of the decompression.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .convert import moe_blocks

__all__ = ["all_experts_active"]


@contextlib.contextmanager
def all_experts_active(model: nn.Module, weight: float = 1.0) -> Iterator[nn.Module]:
    """Within the context, every MoE router of `model` selects all E experts with `weight`.

    The router's logits still come out unchanged; only `(top_k_weights, top_k_index)` are
    replaced by `[T, E]` tensors (`weight` everywhere, expert ids `0..E-1`).
    """

    def hook(router, _args, output):
        logits_TE = output[0]
        num_tokens, num_experts = logits_TE.shape
        weights_TE = torch.full_like(logits_TE, weight)
        index_TE = torch.arange(num_experts, device=logits_TE.device).expand(num_tokens, -1)
        return logits_TE, weights_TE, index_TE

    handles = [block.gate.register_forward_hook(hook) for block in moe_blocks(model)]
    if not handles:
        raise ValueError(f"{type(model).__name__} has no MoE block with a `gate` router")
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
