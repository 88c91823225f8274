"""Pure-PyTorch routing: the CPU path and the oracle for the Triton kernel."""

from __future__ import annotations

import torch

from .metadata import Routing, routing_metadata


def route_reference(
    router_logits_TE: torch.Tensor,
    top_k: int,
    *,
    score: str = "softmax",
    selection_bias_E: torch.Tensor | None = None,
    renormalize: bool = True,
    return_scores: bool = False,
) -> Routing:
    """Score, select top-k (bias for selection only), renormalise, and build the metadata.

    Selection key (the bias never enters the weights): softmax, `logits + selection_bias`;
    sigmoid, `sigmoid(logits) + selection_bias` as DeepSeek-V3 (transformers'
    `e_score_correction_bias`), since there the bias is on the scale of the scores. Without a
    bias the key is the logits (the same order as either score). Ties go to the lower expert id:
    a stable descending sort keeps equal keys in index order.
    """
    logits_TE = router_logits_TE.float()
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
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    tpe, offsets, sort_order, inverse = routing_metadata(experts_TK, num_experts)
    return Routing(
        weights_TK=weights_TK,
        experts_TK=experts_TK.to(torch.int32),
        tokens_per_expert_E=tpe,
        expert_offsets_E1=offsets,
        sort_order_S=sort_order,
        inverse_order_S=inverse,
        num_experts=num_experts,
        scores_TE=scores_TE if return_scores else None,
        logsumexp_T=logsumexp_T,
    )
