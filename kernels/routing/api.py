"""The public routing functions, with their input validation: `route` and `routing_from_topk`.

Shape legend: T tokens, E experts, K = top_k, S = T·K slots.

Every check runs here, before any compute, so a bad input fails with a clear error rather than
inside a kernel; the ops in op.py and the functions in reference.py do not validate.
"""

from __future__ import annotations

import torch

from .._dispatch import call_reference_directly, cpu_eager, resolve_backend
from .metadata import Routing, routing_metadata, sorted_metadata
from .op import route_op, routing_metadata_op
from .reference import route_cpu, route_reference

_SCORES = ("softmax", "sigmoid")


def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    score: str = "softmax",
    selection_bias: torch.Tensor | None = None,
    renormalize: bool = True,
    return_scores: bool = False,
    backend: str = "auto",
) -> Routing:
    """Score router logits, pick the top-k experts per token and build the permutation metadata.

    Args:
        router_logits: `[T, E]` fp32/bf16/fp16.
        top_k: experts per token, 1 <= top_k <= E.
        score: "softmax" or "sigmoid".
        selection_bias: optional `[E]` for *selection only* (auxiliary-loss-free balancing); the
            weights come from the unbiased scores. Softmax: added to the logits; sigmoid: added
            to the sigmoid scores, as DeepSeek-V3 (`e_score_correction_bias`).
        renormalize: divide the k weights by their sum.
        return_scores: also return the full `[T, E]` scores (aux loss, router drift).
        backend: "auto" (the `padd::route` custom op: Triton on CUDA, the reference elsewhere),
            "triton" (the op on the Triton kernels, also on CPU under TRITON_INTERPRET=1) or
            "reference" (the plain PyTorch function, differentiated by autograd).

    Returns:
        A `Routing`: `weights` `[T, K]` fp32, `expert_ids` `[T, K]` int32, the stable
        sort-by-expert permutation of the T·K slots (`sort_order`) and its inverse
        (`inverse_order`), `tokens_per_expert` `[E]` and `expert_offsets` `[E + 1]` (int32),
        `scores` `[T, E]` fp32 when `return_scores`, `logsumexp` `[T]` for softmax.
        Differentiable with respect to the logits through the weights, the scores and the
        logsumexp; never the bias.

    Example:
        >>> r = route(torch.tensor([[2.0, 1.0, 0.0]]), top_k=2)
        >>> r.expert_ids.tolist()
        [[0, 1]]
    """
    _check_route_inputs(router_logits, top_k, score, selection_bias)
    # "auto" resolves to the reference on CPU tensors: the eager check needs no `resolve_backend`.
    if backend == "auto" and cpu_eager("reference", router_logits, selection_bias):
        # Eager on CPU the op's dispatch costs more than routing a few hundred tokens:
        # `route_cpu` is the reference's computation in the fewest ops, with lazy metadata
        # and autograd's native nodes (the op path stays for torch.compile and dispatch modes).
        return route_cpu(
            router_logits,
            top_k,
            score=score,
            selection_bias=selection_bias,
            renormalize=renormalize,
            return_scores=return_scores,
        )
    resolved = resolve_backend(backend, router_logits)
    if backend == "reference":
        # The plain function, differentiated by autograd: the oracle the op is tested against.
        return route_reference(
            router_logits,
            top_k,
            score=score,
            selection_bias=selection_bias,
            renormalize=renormalize,
            return_scores=return_scores,
        )
    # The `padd::route` custom op (Triton on CUDA, the reference elsewhere) keeps
    # torch.compile(fullgraph=True) whole; backend="triton" forces the kernels on CPU too.
    return route_op(
        router_logits,
        top_k,
        score=score,
        selection_bias=selection_bias,
        renormalize=renormalize,
        return_scores=return_scores,
        backend=resolved,
    )


def routing_from_topk(
    expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int, *, backend: str = "auto"
) -> Routing:
    """Wrap routing decisions made elsewhere (e.g. a transformers router) into a `Routing`.

    The metadata comes from the `padd::routing_metadata` custom op: Triton kernels for CUDA
    tensors (no host sync), `routing_metadata` otherwise; `backend` as in `route`. Expert ids
    must lie in [0, num_experts); a token may repeat an id (its slots keep slot order).

    Args:
        expert_ids: `[T, K]` int32/int64 expert ids.
        weights: `[T, K]` gate weights, kept as given (and differentiable as given).
        num_experts: E.

    Returns:
        A `Routing` with the given `weights`, `expert_ids` as int32 `[T, K]`, and the
        permutation metadata (int32 `tokens_per_expert` `[E]`, `expert_offsets` `[E + 1]`,
        `sort_order` `[S]`, `inverse_order` `[S]`); no scores, no logsumexp.

    Example:
        >>> r = routing_from_topk(torch.tensor([[0, 2], [2, 1]]), torch.full((2, 2), 0.5), 3)
        >>> r.tokens_per_expert.tolist(), r.expert_offsets.tolist()
        ([1, 1, 2], [0, 1, 2, 4])
    """
    if expert_ids.dim() != 2 or weights.shape != expert_ids.shape:
        raise ValueError(
            f"expert_ids and weights must both be [T, K]; got {tuple(expert_ids.shape)} "
            f"and {tuple(weights.shape)}"
        )
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_ids must be int32 or int64, got {expert_ids.dtype}")
    if backend == "auto" and cpu_eager("reference", expert_ids):  # integer outputs: never a gradient
        # Eager on CPU: `sorted_metadata`'s five ops on the int32 ids (which `expert_ids` keeps)
        # instead of `routing_metadata`'s fifteen; its offsets also check the ids' range.
        ids_TK = expert_ids.int()
        tpe, offsets, order, inverse = sorted_metadata(ids_TK.reshape(-1), num_experts)
        if ids_TK.numel() and (offsets[0].item() != 0 or offsets[-1].item() != ids_TK.numel()):
            raise ValueError(f"expert_ids must lie in [0, num_experts={num_experts})")
        return Routing(weights, ids_TK, tpe, offsets, order, inverse, num_experts)
    resolved = resolve_backend(backend, expert_ids)
    if call_reference_directly(resolved, expert_ids):
        tpe, offsets, order, inverse = routing_metadata(expert_ids, num_experts)
    else:
        tpe, offsets, order, inverse = routing_metadata_op(expert_ids, num_experts, resolved)
    return Routing(
        weights=weights,
        expert_ids=expert_ids.to(torch.int32),
        tokens_per_expert=tpe,
        expert_offsets=offsets,
        sort_order=order,
        inverse_order=inverse,
        num_experts=num_experts,
    )


def _check_route_inputs(logits: torch.Tensor, top_k: int, score: str, bias: torch.Tensor | None) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E] (rank 2), got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"router_logits must be fp32, bf16 or fp16, got {logits.dtype}")
    num_experts = logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"selection_bias must be a torch.Tensor, got {type(bias).__name__}")
        if bias.shape != (num_experts,):
            raise ValueError(f"selection_bias must have shape [E]=({num_experts},), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"selection_bias must be floating point, got {bias.dtype}")
        if bias.device != logits.device:
            raise ValueError(f"selection_bias is on {bias.device} but router_logits on {logits.device}")
