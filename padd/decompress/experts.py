"""Expert construction: which teacher neurons each expert holds, their down-projection scale,
and the router initialisation.

Shape legend: F = d_ff teacher neurons, H hidden size, N experts, W expert width (`d_ff / k`
when filled, `d_ff / N` for core clusters only), k = top_k.

Decompression (the method): expert j holds its core cluster `C_j` (F/N neurons) and is filled up
to W = F/k with the neurons most important to cluster j's tokens (not already in `C_j`). The
gate/up rows and down columns are copied from the teacher.

Rescaling rule of `down` ("expected", the default): the column of neuron i is multiplied by
`s_i = N / m_i` in every expert that holds it, where `m_i` is the number of experts holding i.

Why: under the warmup's uniform routing each expert is chosen with probability k/N and weighted
1/k, so the student's expected output is
`E[y_S] = Σ_j (k/N)(1/k) Σ_{i∈E_j} s_i d_i a_i = Σ_i (m_i s_i / N) d_i a_i`,
which equals the teacher's `Σ_i d_i a_i` exactly when `s_i = N / m_i`. Neurons of average
multiplicity (`m_i = N/k`, every neuron when experts are slices) get `s_i = k`, i.e. a chosen
expert at weight 1/k passes them at the teacher's scale; a neuron shared by all N experts gets
`s_i = 1` (its k copies at weight 1/k sum to 1). Special cases: k = N with zero router logits
reproduces the teacher exactly; top-1 sparse upcycling (N full copies) gets `s_i = 1`.
Neurons no expert holds (`m_i = 0`) are dropped. `rescale="none"` keeps the teacher's scale
(use with all experts active at weight 1, e.g. the function-preservation check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .neurons import LayerClusters

__all__ = [
    "ExpertPlan",
    "RESCALE_RULES",
    "expert_weights",
    "plan_cluster_experts",
    "plan_upcycled_experts",
    "random_router",
    "router_from_centroids",
]

RESCALE_RULES = ("expected", "none")


@dataclass
class ExpertPlan:
    """One layer's experts as teacher-neuron lists.

    Attributes:
        neurons_NW: int64 teacher neuron ids of each expert (core cluster first, then fill).
        scale_NW: fp32 factor applied to each neuron's down column in that expert.
    """

    neurons_NW: torch.Tensor
    scale_NW: torch.Tensor

    def multiplicity_F(self, num_neurons: int) -> torch.Tensor:
        """How many experts hold each teacher neuron."""
        return torch.bincount(self.neurons_NW.reshape(-1), minlength=num_neurons)


def plan_cluster_experts(
    clusters: LayerClusters,
    width: int,
    importance_NF: torch.Tensor | None = None,
    *,
    fill_proxy_HF: torch.Tensor | None = None,
    rescale: str = "expected",
) -> ExpertPlan:
    """Core clusters filled to `width` with the neurons most important to each cluster.

    Args:
        clusters: the layer's clustering (`F/N` neurons per cluster).
        width: W, the expert width; `F/N` (no fill) up to F.
        importance_NF: importance of each neuron for each cluster (from `collect_stats`). When
            None, the data-free proxy is used: cosine similarity between the neuron's gate row
            (`fill_proxy_HF`, i.e. `gate_proj.weight.T`) and the cluster's mean gate row.
        rescale: "expected" (module docstring) or "none".
    """
    if rescale not in RESCALE_RULES:
        raise ValueError(f"rescale must be one of {RESCALE_RULES}, got {rescale!r}")
    core_NC = clusters.members()
    n, core = core_NC.shape
    num_neurons = n * core
    if not core <= width <= num_neurons:
        raise ValueError(f"expert width {width} must lie in [d_ff/N={core}, d_ff={num_neurons}]")
    neurons_NW = core_NC
    if width > core:
        if importance_NF is None:
            if fill_proxy_HF is None:
                raise ValueError("filling experts needs importance_NF (stats) or fill_proxy_HF (gate rows)")
            rows_FH = torch.nn.functional.normalize(fill_proxy_HF.T.float(), dim=1)
            cents_NH = torch.nn.functional.normalize(clusters.router_NH.float(), dim=1)
            importance_NF = cents_NH.to(rows_FH.device) @ rows_FH.T
        score_NF = importance_NF.float().clone()
        # A cluster's own neurons are already in its expert: never pick them again.
        score_NF.scatter_(1, core_NC.to(score_NF.device), float("-inf"))
        fill_NR = torch.sort(score_NF, dim=1, descending=True, stable=True).indices[:, : width - core]
        neurons_NW = torch.cat([core_NC, fill_NR.to(core_NC.device)], dim=1)
    return ExpertPlan(neurons_NW, _scales(neurons_NW, num_neurons, rescale))


def plan_upcycled_experts(
    num_neurons: int, num_experts: int, top_k: int, *, rescale: str = "expected"
) -> ExpertPlan:
    """Sparse upcycling: expert j is slice `j mod k` of the dense FFN (width F/k).

    With k = 1 every expert is a full copy of the FFN (the classic upcycling).
    """
    if rescale not in RESCALE_RULES:
        raise ValueError(f"rescale must be one of {RESCALE_RULES}, got {rescale!r}")
    width = num_neurons // top_k
    slice_N = torch.arange(num_experts) % top_k
    neurons_NW = slice_N.unsqueeze(1) * width + torch.arange(width)
    return ExpertPlan(neurons_NW, _scales(neurons_NW, num_neurons, rescale))


def _scales(neurons_NW: torch.Tensor, num_neurons: int, rescale: str) -> torch.Tensor:
    n = neurons_NW.shape[0]
    if rescale == "none":
        return torch.ones(neurons_NW.shape, dtype=torch.float32)
    mult_F = torch.bincount(neurons_NW.reshape(-1), minlength=num_neurons).float()
    return n / mult_F[neurons_NW]


@torch.no_grad()
def expert_weights(mlp: nn.Module, plan: ExpertPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the planned neurons of a gated teacher MLP into transformers' fused expert layout.

    Returns:
        `(gate_up_proj [N, 2W, H], down_proj [N, H, W])` in the MLP's dtype: gate rows then up
        rows, and down columns scaled by `plan.scale_NW`.
    """
    gate_FH, up_FH, down_HF = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    idx_NW = plan.neurons_NW.to(gate_FH.device)
    gate_up = torch.cat([gate_FH[idx_NW], up_FH[idx_NW]], dim=1)
    scale_NW = plan.scale_NW.to(device=down_HF.device, dtype=torch.float32)
    # down_HF[:, idx] is [H, N, W]; scaling in fp32 keeps bf16 teachers exact up to one rounding.
    down = (down_HF[:, idx_NW].float() * scale_NW.unsqueeze(0)).permute(1, 0, 2)
    return gate_up.contiguous(), down.to(down_HF.dtype).contiguous()


def router_from_centroids(clusters: LayerClusters, scale: float = 1.0) -> torch.Tensor:
    """`W_r[j] = scale · mean_{i∈C_j} gate_i` (`[N, H]`): logit j is the mean gate pre-activation
    of cluster j's neurons, so the router starts out ranking clusters as the teacher's gates do."""
    return clusters.router_NH * scale


def random_router(num_experts: int, hidden: int, std: float, seed: int) -> torch.Tensor:
    """The upcycling baseline's router: `N(0, std²)` entries from a seeded generator (`[N, H]`)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_experts, hidden, generator=gen) * std
