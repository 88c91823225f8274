"""Pure-PyTorch routing: the CPU path and the oracle for the Triton kernels.

Shape legend: T tokens, E experts, K = top_k.

`route_reference` is the forward (differentiable by autograd); `route_reference_backward` is
its hand-written backward, the same math as the Triton backward kernel, which the
`padd::route` custom op runs on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .metadata import Routing, routing_metadata

_MIN_SUM = 1e-20  # clamp on the renormalisation denominator


def route_reference(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    score: str = "softmax",
    selection_bias: torch.Tensor | None = None,
    renormalize: bool = True,
    return_scores: bool = False,
) -> Routing:
    """Score, select top-k (bias for selection only), renormalise, and build the metadata.

    Same arguments and result as `route` (no validation, no `backend`): `router_logits`
    `[T, E]`, `selection_bias` `[E]`; the `Routing` holds `weights` / `expert_ids` `[T, K]`,
    `scores` `[T, E]` when `return_scores`, `logsumexp` `[T]` for softmax.

    Selection key (the bias never enters the weights): softmax, `logits + selection_bias`;
    sigmoid, `sigmoid(logits) + selection_bias` as DeepSeek-V3 (transformers'
    `e_score_correction_bias`), since there the bias is on the scale of the scores. Without a
    bias the key is the logits (the same order as either score). Ties go to the lower expert id:
    a stable descending sort keeps equal keys in index order.
    """
    logits_TE = router_logits.float()
    selection_bias_E = selection_bias
    num_experts = logits_TE.shape[1]
    if score == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
        logsumexp_T = torch.logsumexp(logits_TE, dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE)
        logsumexp_T = None
    key_TE = logits_TE.detach()
    if selection_bias_E is not None:
        base_TE = key_TE if score == "softmax" else scores_TE.detach()
        key_TE = base_TE + selection_bias_E.detach().float()
    _, order_TE = torch.sort(key_TE, dim=-1, descending=True, stable=True)
    experts_TK = order_TE[:, :top_k]
    weights_TK = torch.gather(scores_TE, 1, experts_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(_MIN_SUM)
    tpe, offsets, sort_order, inverse = routing_metadata(experts_TK, num_experts)
    return Routing(
        weights=weights_TK,
        expert_ids=experts_TK.to(torch.int32),
        tokens_per_expert=tpe,
        expert_offsets=offsets,
        sort_order=sort_order,
        inverse_order=inverse,
        num_experts=num_experts,
        scores=scores_TE if return_scores else None,
        logsumexp=logsumexp_T,
    )


def route_reference_backward(
    logits_TE: Tensor,
    lse_T: Tensor,
    experts_TK: Tensor,
    grad_weights_TK: Tensor | None,
    grad_scores_TE: Tensor | None,
    grad_lse_T: Tensor | None,
    score: str,
    renormalize: bool,
) -> Tensor:
    """d logits `[T, E]` (logits dtype) of `route_reference`'s weights, scores and logsumexp.

    The backward in plain torch (the CPU path of `padd::route_backward`), the same math as the
    Triton kernel. `lse_T` is unused (the softmax is recomputed from the logits).
    """
    x_TE = logits_TE.float()
    p_TE = torch.softmax(x_TE, dim=-1) if score == "softmax" else torch.sigmoid(x_TE)
    g_TE = grad_scores_TE.float().clone() if grad_scores_TE is not None else torch.zeros_like(p_TE)
    if grad_weights_TK is not None:
        idx_TK = experts_TK.long()
        gr_TK = grad_weights_TK.float()
        if renormalize:
            r_TK = torch.gather(p_TE, 1, idx_TK)
            sum_T1 = r_TK.sum(dim=-1, keepdim=True)
            denom_T1 = sum_T1.clamp_min(_MIN_SUM)
            # clamp_min passes gradient only where the sum was not clamped, as in autograd.
            dot_T1 = (gr_TK * r_TK).sum(dim=-1, keepdim=True)
            shift_T1 = torch.where(sum_T1 >= _MIN_SUM, dot_T1 / denom_T1.square(), 0.0)
            gr_TK = gr_TK / denom_T1 - shift_T1
        g_TE = g_TE.scatter_add(1, idx_TK, gr_TK)
    if score == "softmax":
        inner_T1 = (g_TE * p_TE).sum(dim=-1, keepdim=True)
        if grad_lse_T is not None:
            inner_T1 = inner_T1 - grad_lse_T.float().unsqueeze(-1)
        dx_TE = p_TE * (g_TE - inner_T1)
    else:
        dx_TE = g_TE * p_TE * (1.0 - p_TE)
    return dx_TE.to(logits_TE.dtype)
