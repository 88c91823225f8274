"""Routing statistics shared by the trainer and the evaluation (no model, plain tensors).

Legend: L = MoE layers, T = tokens, E = experts, k = experts per token.
"""

from __future__ import annotations

import torch

__all__ = ["expert_counts", "load_cv", "routing_entropy"]


def expert_counts(
    selected_experts: list[torch.Tensor], num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Routed token slots per expert and layer.

    Args:
        selected_experts: L tensors [T, k] of expert ids.
        mask: optional [T] bool/0-1, tokens to count (e.g. non-padding).
    Returns: [L, E] float64 counts (each counted token adds k slots in its layer).
    """
    rows = []
    for sel_TK in selected_experts:
        sel_TK = sel_TK.long()
        if mask is not None:
            sel_TK = sel_TK[mask.reshape(-1).bool()]
        rows.append(torch.bincount(sel_TK.reshape(-1).cpu(), minlength=num_experts).double())
    if not rows:
        return torch.zeros(0, num_experts, dtype=torch.float64)
    return torch.stack(rows)


def load_cv(counts_LE: torch.Tensor) -> float:
    """Coefficient of variation std(load)/mean(load) per layer (population std), mean over layers."""
    if counts_LE.numel() == 0:
        return 0.0
    counts_LE = counts_LE.double()
    mean_L = counts_LE.mean(-1)
    cv_L = counts_LE.std(-1, unbiased=False) / mean_L.clamp_min(1e-12)
    return float(cv_L.mean())


def routing_entropy(router_logits: list[torch.Tensor], mask: torch.Tensor | None = None) -> float:
    """Mean per-token entropy (nats) of the router's softmax, over tokens and layers.

    Args: router_logits: L tensors [T, E]; mask: optional [T] selecting the tokens to average.
    """
    values = []
    for logits_TE in router_logits:
        logp_TE = torch.log_softmax(logits_TE.detach().float(), -1)
        ent_T = -(logp_TE.exp() * logp_TE).sum(-1)
        if mask is not None:
            ent_T = ent_T[mask.reshape(-1).bool()]
        if ent_T.numel():
            values.append(ent_T.mean())
    return float(torch.stack(values).mean()) if values else 0.0
