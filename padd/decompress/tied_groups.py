"""The function-preserving ("exact") decompression: tied groups of experts.

Shape legend: F = d_ff teacher neurons, H hidden size, N experts, k = top_k, G = N / k groups,
W = F / k expert width.

With renormalised top-k weights the student equals its teacher only when the k chosen experts
together hold every neuron exactly once. This construction makes that true for *any* router:

- the N experts form G groups of k consecutive ids (`g·k … g·k + k − 1`);
- each group partitions the F neurons into k experts of W neurons (whole neuron clusters, a
  different partition per group), and every down column is scaled by k;
- the k router rows of a group are tied (equal), and so is their selection bias, so top-k always
  picks one whole group at weights exactly 1/k: `Σ_j (1/k)·k·Σ_{i∈E_j} d_i a_i = Σ_i d_i a_i`.

The groups are plain Mixtral/Qwen-MoE experts, saved as a standard checkpoint; the group size is
recorded in the model config (`padd_router_group_size`) so training can keep the rows tied
(`padd.moe.TiedRouterGroups`). Which group a token takes is then free to learn: the router is
trained by its own objective (`padd.decompress.sequence_targets`), never by the task loss, whose
gradient within a group sums to zero.
"""

from __future__ import annotations

import torch

from padd.moe.router_groups import GROUP_SIZE_KEY

from .experts import ExpertPlan
from .neurons import LayerClusters

__all__ = ["GROUP_SIZE_KEY", "plan_tied_group_experts", "tie_rows"]


def plan_tied_group_experts(clusters: LayerClusters, top_k: int, seed: int = 0) -> ExpertPlan:
    """Experts of N/k groups, each group a partition of the neurons into k experts.

    Args:
        clusters: N balanced neuron clusters of the layer (F/N neurons each); an expert holds
            G = N/k whole clusters.
        top_k: k, the group size; must divide N.
        seed: the partition of clusters within each group (group 0 takes them in order, the
            others a seeded permutation, so groups differ and can specialise apart).

    Returns:
        `ExpertPlan` with `[N, F/k]` neuron ids and a down scale of k everywhere.
    """
    core_NC = clusters.members()
    n = core_NC.shape[0]
    if top_k < 1 or n % top_k:
        raise ValueError(f"top_k={top_k} must divide the number of clusters N={n}")
    groups, per_expert = n // top_k, n // top_k  # G groups; each expert holds G clusters
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for g in range(groups):
        order = torch.arange(n) if g == 0 else torch.randperm(n, generator=gen)
        for j in range(top_k):
            picked = order[j * per_expert : (j + 1) * per_expert]
            rows.append(torch.sort(core_NC[picked].reshape(-1)).values)
    neurons_NW = torch.stack(rows)
    return ExpertPlan(neurons_NW, torch.full(neurons_NW.shape, float(top_k)))


def tie_rows(group_rows_GH: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[G·k, H]` router weight with each group's row repeated for its k experts."""
    return group_rows_GH.repeat_interleave(group_size, dim=0)
