"""`padd::moe_ffn` and `padd::moe_ffn_backward`: torch.library custom ops over the expert FFN.

Shape legend: T tokens, H hidden, I expert width, E experts, K top_k, S = T·K slots.

The ops dispatch on `use_triton`, which `moe_ffn` resolves from the device (`backend="auto"`:
Triton for CUDA tensors; `"triton"` also on CPU under `TRITON_INTERPRET=1`); otherwise the
PyTorch reference runs, whose host sync (`.tolist()` of the offsets) stays inside the opaque op,
so `torch.compile(fullgraph=True)` traces through on CPU too. The backward is its own op for the
same reason. `moe_ffn` applies autocast before the op; inside, the reference runs with autocast
off so its fp32 math stays fp32.

Both ops carry FLOP formulas for `torch.utils.flop_counter.FlopCounterMode`: forward
2·T·K·H·3I, backward twice that when every input needs a gradient (less when some do not; the
Triton backward's gate/up recompute is not counted: it is not useful work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ..routing.metadata import Routing
from .reference import moe_ffn_reference

__all__ = ["moe_ffn_flops", "moe_ffn_op", "moe_ffn_op_from_routing"]


def moe_ffn_flops(num_tokens: int, top_k: int, hidden: int, inter: int) -> int:
    """Forward FLOPs of the expert GEMMs: gate/up (2·H·2I) and down (2·I·H) per slot."""
    return 2 * num_tokens * top_k * hidden * 3 * inter


def _routing(num_experts: int, *fields: torch.Tensor) -> Routing:
    """Rebuild the `Routing` that `moe_ffn_op_from_routing` took apart (fields in dataclass order)."""
    return Routing(*fields, num_experts)


@torch.library.custom_op("padd::moe_ffn", mutates_args=())
def moe_ffn_op(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    expert_offsets_E1: torch.Tensor,
    sort_order_S: torch.Tensor,
    inverse_order_S: torch.Tensor,
    use_triton: bool,
) -> torch.Tensor:
    """Routed SwiGLU experts `[T, H]` from the `Routing` fields (see `moe_ffn`)."""
    if use_triton:
        from .triton import moe_ffn_triton_forward

        return moe_ffn_triton_forward(x, gate_up_proj, down_proj, weights_TK, sort_order_S, expert_offsets_E1)
    fields = (weights_TK, experts_TK, tokens_per_expert_E, expert_offsets_E1, sort_order_S, inverse_order_S)
    routing = _routing(gate_up_proj.shape[0], *fields)
    with torch.autocast(x.device.type, enabled=False):
        return moe_ffn_reference(x, gate_up_proj, down_proj, routing)


@moe_ffn_op.register_fake
def _moe_ffn_fake(x, gate_up_proj, down_proj, weights_TK, *routing_and_flag):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("padd::moe_ffn_backward", mutates_args=())
def moe_ffn_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    expert_offsets_E1: torch.Tensor,
    sort_order_S: torch.Tensor,
    inverse_order_S: torch.Tensor,
    use_triton: bool,
    needs_dx: bool,
    needs_d_gate_up: bool,
    needs_d_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dx, d gate_up_proj, d down_proj, d weights_TK)` of `padd::moe_ffn`.

    A gradient whose `needs_*` flag is False is skipped and returned as an empty `[0]` tensor.
    """
    needs = (needs_dx, needs_d_gate_up, needs_d_down)
    if use_triton:
        from .triton import moe_ffn_triton_backward

        return moe_ffn_triton_backward(
            grad, x, gate_up_proj, down_proj, weights_TK, sort_order_S, expert_offsets_E1, needs=needs
        )
    fields = (weights_TK, experts_TK, tokens_per_expert_E, expert_offsets_E1, sort_order_S, inverse_order_S)
    routing = _routing(gate_up_proj.shape[0], *fields)
    with torch.autocast(x.device.type, enabled=False):
        grads = moe_ffn_reference_backward(grad, x, gate_up_proj, down_proj, routing)
    return tuple(g if need else g.new_empty(0) for g, need in zip(grads, (*needs, True), strict=True))


@moe_ffn_backward_op.register_fake
def _moe_ffn_backward_fake(grad, x, gate_up_proj, down_proj, weights_TK, *routing_and_flags):
    needs = (*routing_and_flags[-3:], True)
    like = (x, gate_up_proj, down_proj, weights_TK)
    return tuple(torch.empty_like(t) if need else t.new_empty(0) for t, need in zip(like, needs, strict=True))


def moe_ffn_reference_backward(
    grad_TH: torch.Tensor,
    x_TH: torch.Tensor,
    gate_up_proj_E2IH: torch.Tensor,
    down_proj_EHI: torch.Tensor,
    routing: Routing,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hand-derived backward of `moe_ffn_reference` in fp32, one expert at a time (CPU path).

    Written out because autograd is not recorded inside a custom op's implementation.
    """
    num_tokens, hidden = x_TH.shape
    top_k, inter = routing.top_k, down_proj_EHI.shape[2]
    tokens_S = routing.sort_order_S.long() // top_k
    x_SH = x_TH.float().index_select(0, tokens_S)
    dy_SH = grad_TH.float().index_select(0, tokens_S)
    w_S = routing.weights_TK.float().reshape(-1).index_select(0, routing.sort_order_S.long())
    dx_SH, dw_S = torch.zeros_like(x_SH), torch.zeros_like(w_S)
    d_gate_up = torch.zeros_like(gate_up_proj_E2IH, dtype=torch.float32)
    d_down = torch.zeros_like(down_proj_EHI, dtype=torch.float32)
    offsets = routing.expert_offsets_E1.tolist()
    for e in range(routing.num_experts):
        rows = slice(offsets[e], offsets[e + 1])
        if offsets[e + 1] == offsets[e]:
            continue
        w13, w2 = gate_up_proj_E2IH[e].float(), down_proj_EHI[e].float()
        gate, up = F.linear(x_SH[rows], w13).split(inter, dim=1)
        sig = torch.sigmoid(gate)
        h = gate * sig * up
        dh_unweighted = dy_SH[rows] @ w2
        dw_S[rows] = (dh_unweighted * h).sum(dim=1)
        dh = dh_unweighted * w_S[rows, None]
        d_down[e] = (dy_SH[rows] * w_S[rows, None]).T @ h
        d_gu = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * gate * sig], dim=1)
        d_gate_up[e] = d_gu.T @ x_SH[rows]
        dx_SH[rows] = d_gu @ w13
    inverse_S = routing.inverse_order_S.long()
    dx_TH = dx_SH.index_select(0, inverse_S).view(num_tokens, top_k, hidden).sum(dim=1)
    dw_TK = dw_S.index_select(0, inverse_S).view(num_tokens, top_k)
    return (
        dx_TH.to(x_TH.dtype),
        d_gate_up.to(gate_up_proj_E2IH.dtype),
        d_down.to(down_proj_EHI.dtype),
        dw_TK.to(routing.weights_TK.dtype),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1])
    ctx.use_triton = inputs[-1]


def _backward(ctx, grad):
    needs = ctx.needs_input_grad[:3]
    grads = moe_ffn_backward_op(grad, *ctx.saved_tensors, ctx.use_triton, *needs)
    grads = [g if need else None for g, need in zip(grads, (*needs, True), strict=True)]
    return *grads, None, None, None, None, None, None


torch.library.register_autograd("padd::moe_ffn", _backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.padd.moe_ffn)
def _moe_ffn_flop(x_shape, gate_up_shape, down_shape, weights_shape, *args, out_shape=None, **kwargs) -> int:
    return moe_ffn_flops(x_shape[0], weights_shape[1], x_shape[1], down_shape[2])


@register_flop_formula(torch.ops.padd.moe_ffn_backward)
def _moe_ffn_backward_flop(
    grad_shape, x_shape, gate_up_shape, down_shape, weights_shape, *args, out_shape=None, **kwargs
) -> int:
    needs_dx, needs_d_gate_up, needs_d_down = args[-3:]
    slots, hidden, inter = x_shape[0] * weights_shape[1], x_shape[1], down_shape[2]
    # Per slot: dh = dy·W2 (H·I) always; dx (2I·H), d gate_up (2I·H), d down (H·I) when asked.
    macs = hidden * inter * (1 + 2 * needs_dx + 2 * needs_d_gate_up + needs_d_down)
    return 2 * slots * macs


def moe_ffn_op_from_routing(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: Routing,
    *,
    use_triton: bool,
) -> torch.Tensor:
    """Call `padd::moe_ffn` with a `Routing`'s tensors (inputs are validated by `moe_ffn`)."""
    return moe_ffn_op(
        x,
        gate_up_proj,
        down_proj,
        routing.weights_TK,
        routing.experts_TK,
        routing.tokens_per_expert_E,
        routing.expert_offsets_E1,
        routing.sort_order_S,
        routing.inverse_order_S,
        use_triton,
    )
