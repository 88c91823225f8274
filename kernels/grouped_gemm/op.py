"""`padd::moe_ffn` and `padd::moe_ffn_backward`: torch.library custom ops over the expert FFN.

Shape legend: T tokens, H hidden, I expert width, E experts, K top_k, S = T·K slots.

The ops dispatch on `use_triton`, which `moe_ffn` resolves from the device (`backend="auto"`:
Triton for CUDA tensors, expert biases included; `"triton"` also on CPU under
`TRITON_INTERPRET=1`); otherwise the PyTorch reference runs, whose host sync (`.tolist()` of
the offsets) stays inside the opaque op, so `torch.compile(fullgraph=True)` traces through on
CPU too. The backward is its own op for the same reason. `moe_ffn` applies autocast before the
op; inside, the reference runs with autocast off so its fp32 math stays fp32.

Both ops carry FLOP formulas for `torch.utils.flop_counter.FlopCounterMode`: forward
2·T·K·H·3I (2·T·K·H·2I for a non-gated activation, whose first GEMM is `[E, I, H]`), backward
twice that when every input needs a gradient (less when some do not; the Triton backward's
gate/up recompute is not counted: it is not useful work). Only GEMMs count: the bias adds and
bias-gradient sums are O(S·(2I + H)), as `FlopCounterMode` leaves elementwise work uncounted.

The forward op also returns what its backward reuses (the reference's gate/up pre-activations;
nothing for Triton): autograd saves it, and `moe_ffn` hands users only the first output.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..routing.metadata import Routing
from .activation import GatedActivation
from .reference import moe_ffn_reference_backward, moe_ffn_reference_forward

__all__ = ["moe_ffn_flops", "moe_ffn_op", "moe_ffn_op_from_routing"]


def moe_ffn_flops(num_tokens: int, top_k: int, hidden: int, inter: int, *, gated: bool = True) -> int:
    """Forward FLOPs of the expert GEMMs per slot: gate/up (2·H·2I, or up alone 2·H·I when not
    `gated`) and down (2·I·H)."""
    return 2 * num_tokens * top_k * hidden * (3 if gated else 2) * inter


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
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    limit: float | None,
    alpha: float | None,
    gate_softcap: float | None,
    up_softcap: float | None,
    interleaved: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed experts `[T, H]` from the `Routing` fields (see `moe_ffn`), and a cache.

    The cache is what the backward reuses: the reference's sorted gate/up pre-activations
    `[S, 2I]` (`[S, I]` non-gated; fp32), or an empty `[0]` tensor for Triton, whose backward
    recomputes them. Both backends run every activation and the optional biases.
    """
    act = GatedActivation(activation, limit, alpha, interleaved, gate_softcap, up_softcap)
    if use_triton:
        from .triton import moe_ffn_triton_forward  # optional dependency: not every platform has triton

        out = moe_ffn_triton_forward(
            x,
            gate_up_proj,
            down_proj,
            weights_TK,
            sort_order_S,
            expert_offsets_E1,
            act,
            gate_up_bias,
            down_bias,
        )
        return out, x.new_empty(0)
    fields = (weights_TK, experts_TK, tokens_per_expert_E, expert_offsets_E1, sort_order_S, inverse_order_S)
    routing = _routing(gate_up_proj.shape[0], *fields)
    with torch.autocast(x.device.type, enabled=False):
        return moe_ffn_reference_forward(x, gate_up_proj, down_proj, routing, act, gate_up_bias, down_bias)


@moe_ffn_op.register_fake
def _moe_ffn_fake(x, gate_up_proj, down_proj, weights_TK, experts_TK, *routing_and_flag):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if routing_and_flag[-1]:  # Triton saves nothing
        return out, x.new_empty(0)
    slots = experts_TK.shape[0] * experts_TK.shape[1]
    return out, x.new_empty(slots, gate_up_proj.shape[1], dtype=torch.float32)


@torch.library.custom_op("padd::moe_ffn_backward", mutates_args=())
def moe_ffn_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_cache: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    expert_offsets_E1: torch.Tensor,
    sort_order_S: torch.Tensor,
    inverse_order_S: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    limit: float | None,
    alpha: float | None,
    gate_softcap: float | None,
    up_softcap: float | None,
    interleaved: bool,
    use_triton: bool,
    needs_dx: bool,
    needs_d_gate_up: bool,
    needs_d_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dx, d gate_up_proj, d down_proj, d weights_TK, d gate_up_bias, d down_bias)` of
    `padd::moe_ffn`.

    A gradient whose `needs_*` flag is False, or of an absent bias, is returned as an empty `[0]`
    tensor.
    """
    needs = (needs_dx, needs_d_gate_up, needs_d_down)
    act = GatedActivation(activation, limit, alpha, interleaved, gate_softcap, up_softcap)
    if use_triton:
        from .triton import moe_ffn_triton_backward  # optional dependency

        return moe_ffn_triton_backward(
            grad, x, gate_up_proj, down_proj, weights_TK, sort_order_S, expert_offsets_E1, needs, act,
            gate_up_bias, down_bias,
        )  # fmt: skip
    fields = (weights_TK, experts_TK, tokens_per_expert_E, expert_offsets_E1, sort_order_S, inverse_order_S)
    routing = _routing(gate_up_proj.shape[0], *fields)
    with torch.autocast(x.device.type, enabled=False):
        grads = moe_ffn_reference_backward(
            grad, x, gate_up_proj, down_proj, routing, gate_up_cache, needs, act, gate_up_bias, down_bias
        )
    like = (x, gate_up_proj, down_proj, weights_TK, gate_up_bias, down_bias)
    return tuple(x.new_empty(0) if g is None else g for g, t in zip(grads, like, strict=True))


@moe_ffn_backward_op.register_fake
def _moe_ffn_backward_fake(
    grad, x, gate_up_proj, down_proj, gate_up_cache, weights_TK, *routing_biases_and_flags
):
    gate_up_bias, down_bias = routing_biases_and_flags[5:7]
    needs = (*routing_biases_and_flags[-3:], True, gate_up_bias is not None, down_bias is not None)
    like = (x, gate_up_proj, down_proj, weights_TK, gate_up_bias, down_bias)
    return tuple(torch.empty_like(t) if need else x.new_empty(0) for t, need in zip(like, needs, strict=True))


# Inputs of `padd::moe_ffn` after the routing fields: the biases, then the non-tensor arguments.
_NUM_ROUTING_FIELDS = 6


def _setup_context(ctx, inputs, output):
    x, gate_up_proj, down_proj, *rest = inputs
    routing_fields = rest[:_NUM_ROUTING_FIELDS]
    gate_up_bias, down_bias, *ctx.options = rest[_NUM_ROUTING_FIELDS:]
    ctx.save_for_backward(x, gate_up_proj, down_proj, output[1], *routing_fields, gate_up_bias, down_bias)


def _backward(ctx, grad, _grad_cache):
    needs = ctx.needs_input_grad[:3]
    grads = moe_ffn_backward_op(grad, *ctx.saved_tensors, *ctx.options, *needs)
    dx, d_gate_up, d_down, d_weights, d_gate_up_bias, d_down_bias = grads
    gate_up_bias, down_bias = ctx.saved_tensors[-2:]
    keep = lambda g, need: g if need else None
    return (
        keep(dx, needs[0]),
        keep(d_gate_up, needs[1]),
        keep(d_down, needs[2]),
        d_weights,
        *(None,) * (_NUM_ROUTING_FIELDS - 1),
        keep(d_gate_up_bias, gate_up_bias is not None),
        keep(d_down_bias, down_bias is not None),
        *(None,) * len(ctx.options),
    )


torch.library.register_autograd("padd::moe_ffn", _backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.padd.moe_ffn)
def _moe_ffn_flop(x_shape, gate_up_shape, down_shape, weights_shape, *args, out_shape=None, **kwargs) -> int:
    gated = gate_up_shape[1] == 2 * down_shape[2]  # a non-gated first weight is [E, I, H]
    return moe_ffn_flops(x_shape[0], weights_shape[1], x_shape[1], down_shape[2], gated=gated)


@register_flop_formula(torch.ops.padd.moe_ffn_backward)
def _moe_ffn_backward_flop(
    grad_shape,
    x_shape,
    gate_up_shape,
    down_shape,
    cache_shape,
    weights_shape,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    needs_dx, needs_d_gate_up, needs_d_down = args[-3:]
    slots, hidden, inter = x_shape[0] * weights_shape[1], x_shape[1], down_shape[2]
    width = gate_up_shape[1]  # 2I, or I for a non-gated activation
    # Per slot: dh = dy·W2 (H·I) always; dx (2I·H), d gate_up (2I·H), d down (H·I) when asked.
    macs = hidden * (inter * (1 + needs_d_down) + width * (needs_dx + needs_d_gate_up))
    return 2 * slots * macs


class MoeFfnCPU(torch.autograd.Function):
    """`padd::moe_ffn` and its backward op on the reference backend as a plain
    `autograd.Function`: the same forward (its gate/up cache saved) and hand-written backward,
    without the two custom ops' dispatch (~1 ms a forward + backward on 2 CPU cores, about a
    third of the whole step at the default student's shapes). `moe_ffn` takes it for eager CPU
    calls with a gradient (`_dispatch.cpu_eager`); torch.compile, dispatch modes (FlopCounterMode)
    and other devices keep the ops."""

    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, weights_TK, routing, activation, gate_up_bias, down_bias):
        routing = Routing(weights_TK, *_routing_fields(routing)[1:], routing.num_experts)
        saved: dict = {}  # the sorted x rows and the SiLU, which the backward then reuses
        with torch.autocast(x.device.type, enabled=False):
            out, cache = moe_ffn_reference_forward(
                x, gate_up_proj, down_proj, routing, activation, gate_up_bias, down_bias, saved
            )
        ctx.num_experts, ctx.activation = routing.num_experts, activation
        # The routing's tensors and the reused intermediates go through save_for_backward too,
        # so saved-tensor hooks (offloading, checkpointing) see every tensor the backward keeps.
        ctx.saved_keys = tuple(saved)
        ctx.save_for_backward(
            x, gate_up_proj, down_proj, cache, gate_up_bias, down_bias,
            *(saved[k] for k in ctx.saved_keys), *_routing_fields(routing),
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad):
        x, gate_up_proj, down_proj, cache, gate_up_bias, down_bias, *rest = ctx.saved_tensors
        reused, fields = rest[: len(ctx.saved_keys)], rest[len(ctx.saved_keys) :]
        routing = Routing(*fields, ctx.num_experts)
        saved = dict(zip(ctx.saved_keys, reused, strict=True))
        needs = tuple(ctx.needs_input_grad[:3])
        with torch.autocast(x.device.type, enabled=False):
            dx, d_gate_up, d_down, d_weights, d_gate_up_bias, d_down_bias = moe_ffn_reference_backward(
                grad, x, gate_up_proj, down_proj, routing, cache, needs, ctx.activation, gate_up_bias,
                down_bias, saved,
            )  # fmt: skip
        return dx, d_gate_up, d_down, d_weights, None, None, d_gate_up_bias, d_down_bias


def _routing_fields(routing: Routing) -> tuple[torch.Tensor, ...]:
    """The tensor fields of a `Routing`, in dataclass order (as `_routing` and `Routing(...)`
    take them)."""
    return (
        routing.weights,
        routing.expert_ids,
        routing.tokens_per_expert,
        routing.expert_offsets,
        routing.sort_order,
        routing.inverse_order,
    )


def moe_ffn_op_from_routing(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: Routing,
    *,
    activation: GatedActivation,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    use_triton: bool,
) -> torch.Tensor:
    """Call `padd::moe_ffn` with a `Routing`'s tensors (inputs are validated by `moe_ffn`)."""
    out, _cache = moe_ffn_op(
        x,
        gate_up_proj,
        down_proj,
        *_routing_fields(routing),
        gate_up_bias,
        down_bias,
        activation.name,
        activation.limit,
        activation.alpha,
        activation.gate_softcap,
        activation.up_softcap,
        activation.interleaved,
        use_triton,
    )
    return out
