"""The routing result: one explicit object that every MoE kernel consumes.

Shape legend: T tokens, E experts, K = top_k, S = T·K token slots. Slot `s = t·K + j` is the
j-th choice of token t.

Invariants (tested in tests/kernels/test_routing_*):
- `sort_order` lists the slots sorted by expert, stably (slots of one expert keep slot order);
- `inverse_order[sort_order] == arange(S)`;
- `tokens_per_expert.sum() == S` and `expert_offsets == [0, cumsum(tokens_per_expert)]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Top-k routing decisions plus the permutation metadata the grouped expert GEMMs need.

    T tokens, E experts, K = top_k; slot `s = t·K + j` is the j-th choice of token t.

    Attributes:
        weights: `[T, K]` fp32 gate weights of the chosen experts (differentiable).
        expert_ids: `[T, K]` int32 ids of the chosen experts; ties resolve to the lower id.
        tokens_per_expert: `[E]` int32 number of slots routed to each expert.
        expert_offsets: `[E + 1]` int32 `[0, cumsum(tokens_per_expert)]`.
        sort_order: `[T·K]` int32 slot ids sorted by expert (stable).
        inverse_order: `[T·K]` int32 position of each slot in `sort_order`.
        num_experts: E.
        scores: `[T, E]` fp32 full score vector (softmax or sigmoid of the logits), when
            requested (`route(..., return_scores=True)`), else None.
        logsumexp: `[T]` fp32 log-sum-exp of the logits per token (for the z-loss), when
            available (`route(..., score="softmax")`), else None.
    """

    weights: torch.Tensor
    expert_ids: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    sort_order: torch.Tensor
    inverse_order: torch.Tensor
    num_experts: int
    scores: torch.Tensor | None = None
    logsumexp: torch.Tensor | None = None

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    def load_fraction(self) -> torch.Tensor:
        """f_i: fraction of routed slots that went to each expert, fp32 [E] (no gradient)."""
        total = max(self.num_tokens * self.top_k, 1)
        return self.tokens_per_expert.float() / total

    def aux_loss(self) -> torch.Tensor:
        """Switch-style load-balancing loss `E · Σ_i f_i · P_i` (needs `scores`)."""
        if self.scores is None:
            raise ValueError("aux_loss needs the full scores: call route(..., return_scores=True)")
        if self.num_tokens == 0:
            return self.scores.sum() * 0.0
        prob_mean_E = self.scores.mean(dim=0)
        return self.num_experts * torch.sum(self.load_fraction() * prob_mean_E)

    def z_loss(self) -> torch.Tensor:
        """Router z-loss `mean_t logsumexp(z_t)^2` (ST-MoE)."""
        if self.logsumexp is None:
            raise ValueError("z_loss needs the logsumexp, which route() computes for score='softmax'")
        if self.num_tokens == 0:
            return self.logsumexp.sum() * 0.0
        return self.logsumexp.square().mean()


def routing_metadata(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Permutation metadata from expert choices, in plain torch (no host sync).

    The reference of the `padd::routing_metadata` op (and its CPU path).

    Args:
        expert_ids: `[T, K]` integer expert ids in [0, num_experts).
        num_experts: E.

    Returns:
        `(tokens_per_expert [E], expert_offsets [E + 1], sort_order [T·K], inverse_order [T·K])`,
        all int32: the `Routing` fields of the same names.
    """
    flat_S = expert_ids.reshape(-1).to(torch.int64)
    # Stable sort keeps slots of one expert in slot order: deterministic gathers and combines.
    _, sort_order_S = torch.sort(flat_S, stable=True)
    # One op per field (scatter, pad): Python indexing and slice assignment cost more than the
    # work itself at decode sizes on CPU.
    arange_S = torch.arange(flat_S.numel(), device=flat_S.device)
    inverse_order_S = torch.empty_like(sort_order_S).scatter_(0, sort_order_S, arange_S)
    tokens_per_expert_E = torch.bincount(flat_S, minlength=num_experts)[:num_experts]
    expert_offsets_E1 = torch.nn.functional.pad(torch.cumsum(tokens_per_expert_E, dim=0), (1, 0))
    return (
        tokens_per_expert_E.to(torch.int32),
        expert_offsets_E1.to(torch.int32),
        sort_order_S.to(torch.int32),
        inverse_order_S.to(torch.int32),
    )
