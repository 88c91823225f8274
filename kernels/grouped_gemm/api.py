"""The public grouped expert FFN, `moe_ffn(x, gate_up_proj, down_proj, routing)` -> `[T, H]`,
with its input validation.

`backend="auto"` and `"triton"` go through the `padd::moe_ffn` custom op (op.py), which runs the
Triton kernels (triton.py) on CUDA and the PyTorch reference (reference.py) on CPU.
"""

from __future__ import annotations

import torch

from .._dispatch import call_reference_directly, resolve_backend
from ..routing.metadata import Routing
from .op import moe_ffn_op_from_routing
from .reference import moe_ffn_reference

__all__ = ["moe_ffn"]


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
        backend: "auto" (the custom op: Triton on CUDA, the reference on CPU), "triton" (force
            the kernels; on CPU only under `TRITON_INTERPRET=1`) or "reference" (the plain
            PyTorch function, differentiated by autograd).

    Returns:
        `[T, H]` in x's dtype (the autocast dtype under `torch.autocast`). Differentiable in
        x, both weights and `routing.weights`; deterministic (each token's K slots are summed
        in slot order, no atomics).

    Example:
        >>> from padd.kernels import routing_from_topk
        >>> x, w13, w2 = torch.randn(3, 8), torch.randn(4, 2 * 16, 8), torch.randn(4, 8, 16)
        >>> r = routing_from_topk(torch.tensor([[0, 2], [2, 3], [1, 0]]), torch.full((3, 2), 0.5), 4)
        >>> moe_ffn(x, w13, w2, r).shape
        torch.Size([3, 8])
    """
    _check_types(x, gate_up_proj, down_proj, routing)
    x, gate_up_proj, down_proj = _autocast(x, gate_up_proj, down_proj)
    _check_moe_inputs(x, gate_up_proj, down_proj, routing)
    if backend == "reference":
        return moe_ffn_reference(x, gate_up_proj, down_proj, routing)
    resolved = resolve_backend(backend, x, gate_up_proj, down_proj)
    if call_reference_directly(resolved, x, gate_up_proj, down_proj, routing.weights):
        return moe_ffn_reference(x, gate_up_proj, down_proj, routing)
    return moe_ffn_op_from_routing(x, gate_up_proj, down_proj, routing, use_triton=resolved == "triton")


def _check_types(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: Routing) -> None:
    for name, t in (("x", x), ("gate_up_proj", w13), ("down_proj", w2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a padd.kernels.Routing, got {type(routing).__name__}")


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under `torch.autocast`, compute in its dtype like `F.linear` does (e.g. fp32 master weights)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t for t in tensors
    )


def _check_moe_inputs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: Routing) -> None:
    _check_weight_shapes(x, w13, w2)
    for name, t in (("x", x), ("gate_up_proj", w13), ("down_proj", w2)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be fp32, bf16 or fp16, got {t.dtype}")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise TypeError(
            f"x, gate_up_proj and down_proj must share a dtype; got {x.dtype}, {w13.dtype}, {w2.dtype}"
        )
    _check_routing(routing, x, w13.shape[0])


def _check_weight_shapes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            "gate_up_proj must be [E, 2I, H] and down_proj [E, H, I]; "
            f"got {tuple(w13.shape)} and {tuple(w2.shape)}"
        )
    num_experts, two_inter, hidden = w13.shape
    if two_inter % 2 or two_inter == 0:
        raise ValueError(f"gate_up_proj's second dim must be 2·I (even, > 0), got {two_inter}")
    if hidden != x.shape[1]:
        raise ValueError(f"gate_up_proj hidden size {hidden} != x hidden size {x.shape[1]}")
    if w2.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(
            f"down_proj must be [E, H, I]=({num_experts}, {hidden}, {two_inter // 2}), got {tuple(w2.shape)}"
        )


def _check_routing(routing: Routing, x: torch.Tensor, num_experts: int) -> None:
    if routing.num_experts != num_experts:
        raise ValueError(f"routing was built for {routing.num_experts} experts, weights hold {num_experts}")
    if routing.num_tokens != x.shape[0]:
        raise ValueError(f"routing covers {routing.num_tokens} tokens, x has {x.shape[0]}")
    num_slots = routing.num_tokens * routing.top_k
    expected = {
        "weights": (routing.weights, tuple(routing.expert_ids.shape)),
        "tokens_per_expert": (routing.tokens_per_expert, (num_experts,)),
        "expert_offsets": (routing.expert_offsets, (num_experts + 1,)),
        "sort_order": (routing.sort_order, (num_slots,)),
        "inverse_order": (routing.inverse_order, (num_slots,)),
    }
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"routing.{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"routing.{name} is on {t.device}, x on {x.device}")
    if not routing.weights.is_floating_point():
        raise TypeError(f"routing.weights must be floating point, got {routing.weights.dtype}")
    for name in ("expert_ids", "tokens_per_expert", "expert_offsets", "sort_order", "inverse_order"):
        t = getattr(routing, name)
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"routing.{name} must be int32 or int64, got {t.dtype}")
