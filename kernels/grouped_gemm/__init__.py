"""Grouped expert FFN: `moe_ffn(x, gate_up_proj, down_proj, routing)` -> `[T, H]`."""

from __future__ import annotations

import torch

from .._dispatch import resolve_backend
from ..routing.metadata import Routing
from .reference import moe_ffn_reference

__all__ = ["moe_ffn", "moe_ffn_reference"]


def moe_ffn(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: Routing,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Routed SwiGLU experts, `Σ_j w_tj · down_e(silu(gate_e x_t) * up_e x_t)`.

    Args:
        x: `[T, H]` token activations.
        gate_up_proj: `[E, 2I, H]`, transformers' fused layout (gate rows, then up rows).
        down_proj: `[E, H, I]`.
        routing: the `Routing` of these T tokens (from `route` or `routing_from_topk`).
        backend: "auto", "triton" or "reference".

    Returns:
        `[T, H]` in x's dtype.
    """
    _check_moe_inputs(x, gate_up_proj, down_proj, routing)
    if resolve_backend(backend, x) == "triton":
        from .triton import moe_ffn_triton

        return moe_ffn_triton(x, gate_up_proj, down_proj, routing)
    return moe_ffn_reference(x, gate_up_proj, down_proj, routing)


def _check_moe_inputs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: Routing) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"gate_up_proj must be [E, 2I, H] and down_proj [E, H, I]; got {tuple(w13.shape)} and {tuple(w2.shape)}"
        )
    num_experts, two_inter, hidden = w13.shape
    if two_inter % 2:
        raise ValueError(f"gate_up_proj's second dim must be 2·I (even), got {two_inter}")
    if hidden != x.shape[1]:
        raise ValueError(f"gate_up_proj hidden size {hidden} != x hidden size {x.shape[1]}")
    if w2.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"down_proj must be [E, H, I]=({num_experts}, {hidden}, {two_inter // 2}), got {tuple(w2.shape)}")
    for name, t in (("x", x), ("gate_up_proj", w13), ("down_proj", w2)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be fp32, bf16 or fp16, got {t.dtype}")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise TypeError(f"x, gate_up_proj and down_proj must share a dtype; got {x.dtype}, {w13.dtype}, {w2.dtype}")
    if routing.num_experts != num_experts:
        raise ValueError(f"routing was built for {routing.num_experts} experts, weights hold {num_experts}")
    if routing.num_tokens != x.shape[0]:
        raise ValueError(f"routing covers {routing.num_tokens} tokens, x has {x.shape[0]}")
