"""The routing result: one explicit object that every MoE kernel consumes.

Shape legend: T tokens, E experts, K = top_k, S = T·K token slots. Slot `s = t·K + j` is the
j-th choice of token t.

Invariants (tested in tests/kernels/test_routing_*):
- `sort_order_S` lists the slots sorted by expert, stably (slots of one expert keep slot order);
- `inverse_order_S[sort_order_S] == arange(S)`;
- `tokens_per_expert_E.sum() == S` and `expert_offsets_E1 == [0, cumsum(tokens_per_expert_E)]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Top-k routing decisions plus the permutation metadata the grouped expert GEMMs need.

    Attributes:
        weights_TK: fp32 gate weights of the chosen experts (differentiable).
        experts_TK: int32 ids of the chosen experts; ties resolve to the lower id.
        tokens_per_expert_E: int32 number of slots routed to each expert.
        expert_offsets_E1: int32 `[0, cumsum(tokens_per_expert_E)]`, length E + 1.
        sort_order_S: int32 slot ids sorted by expert (stable).
        inverse_order_S: int32 position of each slot in `sort_order_S`.
        num_experts: E.
        scores_TE: fp32 full score vector (softmax or sigmoid of the logits), when requested.
        logsumexp_T: fp32 log-sum-exp of the logits per token (for the z-loss), when available.
    """

    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    expert_offsets_E1: torch.Tensor
    sort_order_S: torch.Tensor
    inverse_order_S: torch.Tensor
    num_experts: int
    scores_TE: torch.Tensor | None = None
    logsumexp_T: torch.Tensor | None = None

    @property
    def top_k(self) -> int:
        return self.experts_TK.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.experts_TK.shape[0]

    def load_fraction(self) -> torch.Tensor:
        """f_i: fraction of routed slots that went to each expert, fp32 [E] (no gradient)."""
        total = max(self.num_tokens * self.top_k, 1)
        return self.tokens_per_expert_E.float() / total

    def aux_loss(self) -> torch.Tensor:
        """Switch-style load-balancing loss `E · Σ_i f_i · P_i` (needs `scores_TE`)."""
        if self.scores_TE is None:
            raise ValueError("aux_loss needs the full scores: call route(..., return_scores=True)")
        if self.num_tokens == 0:
            return self.scores_TE.sum() * 0.0
        prob_mean_E = self.scores_TE.mean(dim=0)
        return self.num_experts * torch.sum(self.load_fraction() * prob_mean_E)

    def z_loss(self) -> torch.Tensor:
        """Router z-loss `mean_t logsumexp(z_t)^2` (ST-MoE)."""
        if self.logsumexp_T is None:
            raise ValueError("z_loss needs logsumexp_T, which route() computes for score='softmax'")
        if self.num_tokens == 0:
            return self.logsumexp_T.sum() * 0.0
        return self.logsumexp_T.square().mean()


def routing_metadata(experts_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Permutation metadata from expert choices `[T, K]`, in plain torch (no host sync).

    The reference of the `padd::routing_metadata` op (and its CPU path).

    Returns `(tokens_per_expert_E, expert_offsets_E1, sort_order_S, inverse_order_S)`, all int32.
    """
    flat_S = experts_TK.reshape(-1).to(torch.int64)
    # Stable sort keeps slots of one expert in slot order: deterministic gathers and combines.
    _, sort_order_S = torch.sort(flat_S, stable=True)
    inverse_order_S = torch.empty_like(sort_order_S)
    inverse_order_S[sort_order_S] = torch.arange(flat_S.numel(), device=flat_S.device)
    tokens_per_expert_E = torch.bincount(flat_S, minlength=num_experts)[:num_experts]
    expert_offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat_S.device)
    expert_offsets_E1[1:] = torch.cumsum(tokens_per_expert_E, dim=0)
    return (
        tokens_per_expert_E.to(torch.int32),
        expert_offsets_E1.to(torch.int32),
        sort_order_S.to(torch.int32),
        inverse_order_S.to(torch.int32),
    )
