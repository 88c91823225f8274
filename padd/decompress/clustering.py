"""Balanced k-means of FFN neurons: N clusters of exactly `n / N` neurons each.

Shape legend: F neurons (the teacher's `d_ff`), D feature size per neuron (hidden size `d`, or
`2d` for `[gate; up]` rows), N clusters, M = F / N neurons per cluster.

Objective (normalised rows `w_i`): `Σ_j Σ_{i∈C_j} ||w_i − μ_j||²` with `μ_j` the mean of cluster
j's rows, subject to `|C_j| = M`. Lloyd iterations alternate
- a *balanced* assignment: every unassigned neuron proposes to its cheapest cluster that still
  has room, each cluster keeps its cheapest proposers up to its remaining capacity, repeat.
  Each round is a few vectorised ops over `[F, N]` costs, and a round fills at least one
  cluster or assigns every proposer, so there are at most N rounds;
- the centroid update (cluster means).
Initialisation is k-means++ under a seeded generator; all sorts are stable, so a seed gives the
same clusters on the same device.

Cost per iteration: one `[F, D] @ [D, N]` matmul plus `O(F·N)` work per round, i.e. well under
a second at F = 18944, D = 3584, N = 128 on a GPU, and seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ClusterResult", "balanced_kmeans", "clustering_objective", "random_balanced_split"]


@dataclass
class ClusterResult:
    """A balanced partition of F neurons into N clusters.

    Attributes:
        assignment_F: int64 cluster id of every neuron, each id used exactly F / N times.
        centroids_ND: fp32 cluster means of the *normalised* rows.
        objective: `Σ_i ||w_i − μ_{c(i)}||²` on the normalised rows (lower is better).
        iterations: Lloyd iterations run (0 for a random split).
    """

    assignment_F: torch.Tensor
    centroids_ND: torch.Tensor
    objective: float
    iterations: int = 0

    @property
    def num_clusters(self) -> int:
        return self.centroids_ND.shape[0]

    def members(self) -> torch.Tensor:
        """`[N, M]` neuron ids of each cluster, ascending within a cluster."""
        order = torch.sort(self.assignment_F, stable=True).indices
        return order.view(self.num_clusters, -1)


def balanced_kmeans(
    rows_FD: torch.Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 30,
    normalize: bool = True,
) -> ClusterResult:
    """Cluster the rows into `num_clusters` groups of exactly `F / num_clusters` rows.

    Args:
        rows_FD: one row per neuron (e.g. the gate projection's weight, `[d_ff, d]`).
        num_clusters: N; must divide F.
        seed: seeds k-means++; equal seeds give equal results on one device.
        max_iter: Lloyd iterations at most (stops early when the assignment is stable).
        normalize: L2-normalise rows first (neurons compared by direction, not scale).

    Returns:
        `ClusterResult` with the assignment, centroids and objective.

    Example:
        >>> r = balanced_kmeans(torch.randn(64, 8), 4)
        >>> torch.bincount(r.assignment_F).tolist()
        [16, 16, 16, 16]
    """
    x_FD = _prepare(rows_FD, num_clusters, normalize)
    gen = torch.Generator(device=x_FD.device).manual_seed(seed)
    centroids_ND = _kmeans_pp_init(x_FD, num_clusters, gen)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    assignment_F = None
    iterations = 0
    for step in range(1, max_iter + 1):
        iterations = step
        new_assignment_F = _balanced_assign(_sq_dist(x_FD, centroids_ND))
        if assignment_F is not None and torch.equal(new_assignment_F, assignment_F):
            break
        assignment_F = new_assignment_F
        centroids_ND = _centroids(x_FD, assignment_F, num_clusters)
    return ClusterResult(
        assignment_F=assignment_F,
        centroids_ND=centroids_ND,
        objective=clustering_objective(x_FD, assignment_F, num_clusters, normalize=False),
        iterations=iterations,
    )


def random_balanced_split(
    rows_FD: torch.Tensor, num_clusters: int, *, seed: int = 0, normalize: bool = True
) -> ClusterResult:
    """The baseline: a uniformly random partition into equal clusters (seeded)."""
    x_FD = _prepare(rows_FD, num_clusters, normalize)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm_F = torch.randperm(x_FD.shape[0], generator=gen).to(x_FD.device)
    assignment_F = torch.empty_like(perm_F)
    size = x_FD.shape[0] // num_clusters
    assignment_F[perm_F] = torch.arange(x_FD.shape[0], device=x_FD.device) // size
    return ClusterResult(
        assignment_F=assignment_F,
        centroids_ND=_centroids(x_FD, assignment_F, num_clusters),
        objective=clustering_objective(x_FD, assignment_F, num_clusters, normalize=False),
    )


def clustering_objective(
    rows_FD: torch.Tensor, assignment_F: torch.Tensor, num_clusters: int, *, normalize: bool = True
) -> float:
    """`Σ_i ||w_i − μ_{c(i)}||²` with `μ` the cluster means (rows normalised first by default)."""
    x_FD = rows_FD.float()
    if normalize:
        x_FD = torch.nn.functional.normalize(x_FD, dim=1)
    centroids_ND = _centroids(x_FD, assignment_F, num_clusters)
    return float((x_FD - centroids_ND[assignment_F]).square().sum())


def _prepare(rows_FD: torch.Tensor, num_clusters: int, normalize: bool) -> torch.Tensor:
    if rows_FD.dim() != 2:
        raise ValueError(f"rows must be [F, D], got shape {tuple(rows_FD.shape)}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive int, got {num_clusters!r}")
    if rows_FD.shape[0] % num_clusters:
        raise ValueError(
            f"{rows_FD.shape[0]} neurons cannot be split into {num_clusters} equal clusters "
            f"({rows_FD.shape[0]} % {num_clusters} != 0)"
        )
    x_FD = rows_FD.detach().float()
    return torch.nn.functional.normalize(x_FD, dim=1) if normalize else x_FD


def _sq_dist(x_FD: torch.Tensor, c_ND: torch.Tensor) -> torch.Tensor:
    """`[F, N]` squared Euclidean distances via one matmul."""
    d_FN = x_FD.square().sum(1, keepdim=True) - 2.0 * (x_FD @ c_ND.T) + c_ND.square().sum(1)
    return d_FN.clamp_min_(0.0)


def _kmeans_pp_init(x_FD: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability ∝ squared distance."""
    num = x_FD.shape[0]
    first = int(torch.randint(num, (1,), generator=gen, device=x_FD.device))
    centres = [first]
    d2_F = _sq_dist(x_FD, x_FD[first : first + 1]).squeeze(1)
    for _ in range(1, n):
        probs_F = d2_F / d2_F.sum() if float(d2_F.sum()) > 0 else torch.ones_like(d2_F) / num
        nxt = int(torch.multinomial(probs_F, 1, generator=gen))
        centres.append(nxt)
        d2_F = torch.minimum(d2_F, _sq_dist(x_FD, x_FD[nxt : nxt + 1]).squeeze(1))
    return x_FD[centres].clone()


def _balanced_assign(cost_FN: torch.Tensor) -> torch.Tensor:
    """Capacity-constrained greedy assignment: exactly F / N neurons per cluster.

    Rounds of proposals: each unassigned neuron proposes to its cheapest open cluster; a
    cluster accepts its cheapest proposers up to its remaining room; full clusters close.
    """
    num, n = cost_FN.shape
    device = cost_FN.device
    room_N = torch.full((n,), num // n, dtype=torch.int64, device=device)
    assignment_F = torch.full((num,), -1, dtype=torch.int64, device=device)
    open_N = torch.ones(n, dtype=torch.bool, device=device)
    while True:
        free_U = (assignment_F < 0).nonzero().squeeze(1)
        if free_U.numel() == 0:
            return assignment_F
        cost_UN = cost_FN[free_U].masked_fill(~open_N, float("inf"))
        best_cost_U, best_U = cost_UN.min(dim=1)
        # Group proposals by cluster, cheapest first (two stable sorts = lexicographic order).
        by_cost = torch.sort(best_cost_U, stable=True).indices
        by_cluster = by_cost[torch.sort(best_U[by_cost], stable=True).indices]
        cluster_S = best_U[by_cluster]
        counts_N = torch.bincount(cluster_S, minlength=n)
        starts_N = torch.cumsum(counts_N, 0) - counts_N
        rank_S = torch.arange(cluster_S.numel(), device=device) - starts_N[cluster_S]
        accept_S = rank_S < room_N[cluster_S]
        assignment_F[free_U[by_cluster[accept_S]]] = cluster_S[accept_S]
        room_N -= torch.bincount(cluster_S[accept_S], minlength=n)
        open_N = room_N > 0


def _centroids(x_FD: torch.Tensor, assignment_F: torch.Tensor, n: int) -> torch.Tensor:
    sums_ND = x_FD.new_zeros(n, x_FD.shape[1]).index_add_(0, assignment_F, x_FD)
    counts_N = torch.bincount(assignment_F, minlength=n).clamp_min(1).to(x_FD.dtype)
    return sums_ND / counts_N.unsqueeze(1)
