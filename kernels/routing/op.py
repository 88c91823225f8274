"""`padd::route`, `padd::route_backward` and `padd::routing_metadata`: routing as opaque
`torch.library` custom ops.

The ops make `torch.compile(fullgraph=True)` trace through routing: the sort, bincount and
scatter of the reference (data-dependent on CPU) and the Triton launches (on CUDA) stay inside
one opaque node whose output shapes are static (`register_fake`).

Each op runs either the Triton kernels or the PyTorch reference, as its `backend` argument says;
`route(backend="auto")` passes "triton" for CUDA tensors and "reference" otherwise. The Triton
module is imported inside the "triton" branches, on first use: the reference path must work
where `import triton` fails. Validation lives in api.py, before these ops are called.

Shape legend: T tokens, E experts, K = top_k, S = T·K slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .metadata import Routing, routing_metadata
from .reference import route_reference, route_reference_backward

_RouteOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("padd::route", mutates_args=())
def _route_op(
    logits: Tensor,
    top_k: int,
    score: str,
    selection_bias: Tensor | None,
    renormalize: bool,
    return_scores: bool,
    backend: str,
) -> _RouteOut:
    """Returns the `Routing` tensors in field order, `(weights_TK, experts_TK, tokens_per_expert_E,
    expert_offsets_E1, sort_order_S, inverse_order_S, scores_TE, logsumexp_T)`; `scores_TE` is
    `[0, E]` unless `return_scores`, `logsumexp_T` is `[0]` for sigmoid (custom ops cannot return
    None)."""
    if backend == "triton":
        from .triton import route_forward_triton

        return route_forward_triton(logits, top_k, score, selection_bias, renormalize, return_scores)
    r = route_reference(
        logits,
        top_k,
        score=score,
        selection_bias=selection_bias,
        renormalize=renormalize,
        return_scores=return_scores,
    )
    num_tokens, num_experts = logits.shape
    empty = logits.new_empty
    scores_TE = r.scores if return_scores else empty(0, num_experts, dtype=torch.float32)
    lse_T = r.logsumexp if r.logsumexp is not None else empty(0, dtype=torch.float32)
    return (
        r.weights.contiguous(),
        r.expert_ids.contiguous(),
        r.tokens_per_expert,
        r.expert_offsets,
        r.sort_order,
        r.inverse_order,
        scores_TE,
        lse_T,
    )


@_route_op.register_fake
def _route_op_fake(logits, top_k, score, selection_bias, renormalize, return_scores, backend):
    num_tokens, num_experts = logits.shape
    f32, i32 = torch.float32, torch.int32
    new = logits.new_empty
    return (
        new(num_tokens, top_k, dtype=f32),
        new(num_tokens, top_k, dtype=i32),
        new(num_experts, dtype=i32),
        new(num_experts + 1, dtype=i32),
        new(num_tokens * top_k, dtype=i32),
        new(num_tokens * top_k, dtype=i32),
        new(num_tokens if return_scores else 0, num_experts, dtype=f32),
        new(num_tokens if score == "softmax" else 0, dtype=f32),
    )


@torch.library.custom_op("padd::route_backward", mutates_args=())
def _route_backward_op(
    logits: Tensor,
    logsumexp: Tensor,
    experts: Tensor,
    grad_weights: Tensor | None,
    grad_scores: Tensor | None,
    grad_logsumexp: Tensor | None,
    score: str,
    renormalize: bool,
    backend: str,
) -> Tensor:
    """d logits `[T, E]` in the logits' dtype."""
    if backend == "triton":
        from .triton import route_backward_triton

        return route_backward_triton(
            logits, logsumexp, experts, grad_weights, grad_scores, grad_logsumexp, score, renormalize
        )
    return route_reference_backward(
        logits, logsumexp, experts, grad_weights, grad_scores, grad_logsumexp, score, renormalize
    )


@_route_backward_op.register_fake
def _route_backward_fake(logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    logits, _, score, _, renormalize, return_scores, backend = inputs
    ctx.save_for_backward(logits, output[7], output[1])
    ctx.score, ctx.renormalize, ctx.return_scores, ctx.backend = score, renormalize, return_scores, backend


def _backward(ctx, grad_w, _ge, _gt, _go, _gs, _gi, grad_scores, grad_lse):
    logits, lse_T, experts_TK = ctx.saved_tensors
    if not ctx.return_scores:
        grad_scores = None
    if ctx.score != "softmax":
        grad_lse = None
    grad_logits = _route_backward_op(
        logits, lse_T, experts_TK, grad_w, grad_scores, grad_lse, ctx.score, ctx.renormalize, ctx.backend
    )
    return grad_logits, None, None, None, None, None, None


_route_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("padd::routing_metadata", mutates_args=())
def _routing_metadata_op(
    experts: Tensor, num_experts: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(tokens_per_expert_E, expert_offsets_E1, sort_order_S, inverse_order_S)`, int32."""
    if backend == "triton":
        from .triton import routing_metadata_triton

        return routing_metadata_triton(experts, num_experts)
    return routing_metadata(experts, num_experts)


@_routing_metadata_op.register_fake
def _routing_metadata_fake(experts, num_experts, backend):
    num_slots = experts.numel()
    new = experts.new_empty
    i32 = torch.int32
    return (
        new(num_experts, dtype=i32),
        new(num_experts + 1, dtype=i32),
        new(num_slots, dtype=i32),
        new(num_slots, dtype=i32),
    )


def routing_metadata_op(experts_TK: Tensor, num_experts: int, backend: str) -> tuple[Tensor, ...]:
    """`routing_metadata` through the `padd::routing_metadata` op; `backend` is "triton" or
    "reference". Opaque to torch.compile, so the data-dependent bincount/sort never break a graph."""
    return _routing_metadata_op(experts_TK, num_experts, backend)


def route_op(
    router_logits: Tensor,
    top_k: int,
    *,
    score: str,
    selection_bias: Tensor | None,
    renormalize: bool,
    return_scores: bool,
    backend: str,
) -> Routing:
    """Call `padd::route` with `backend` in {"triton", "reference"} and wrap it as a `Routing`."""
    num_experts = router_logits.shape[1]
    if selection_bias is not None:
        selection_bias = selection_bias.detach()  # selection only: the bias never gets a gradient
    w, ids, tpe, offsets, order, inverse, scores, lse = _route_op(
        router_logits, top_k, score, selection_bias, renormalize, return_scores, backend
    )
    return Routing(
        weights=w,
        expert_ids=ids,
        tokens_per_expert=tpe,
        expert_offsets=offsets,
        sort_order=order,
        inverse_order=inverse,
        num_experts=num_experts,
        scores=scores if return_scores else None,
        logsumexp=lse if score == "softmax" else None,
    )
