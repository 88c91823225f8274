"""Teacher FFN activation statistics on `D_A`, streamed with forward hooks, and cluster targets.

Shape legend: T tokens (batch·seq, flattened), F = d_ff neurons, N clusters/experts.

- Cluster scores: `s_j(x) = mean_{i∈C_j} a_i(x) / ξ`, with `a_i(x)` the input of `down_proj`
  (`silu(g_i·x) · (u_i·x)`); the per-token cluster targets are `p_T(x) = softmax(s(x))`.
- Neuron importance for cluster j (co-activation, as in LLaMA-MoE's neuron sharing):
  `I_j(i) = E_x[p_T(x)_j · |a_i(x)|] / E_x[p_T(x)_j] · ||down[:, i]||`: how strongly neuron i
  contributes to the output on the tokens that cluster j's expert will see. Only `[N, F]`
  accumulators are kept per layer: activations are never stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .neurons import TeacherClusters, cluster_teacher, teacher_mlps

__all__ = [
    "ClusterScoreHooks",
    "NeuronStats",
    "cluster_scores",
    "cluster_targets",
    "collect_stats",
    "unpack_batch",
]


def cluster_scores(
    act_TF: torch.Tensor, assignment_F: torch.Tensor, num_clusters: int, xi: float = 1.0
) -> torch.Tensor:
    """`[T, N]` fp32 `mean_{i∈C_j} a_i / ξ` (the logits of the teacher cluster targets)."""
    act_TF = act_TF.reshape(-1, act_TF.shape[-1]).float()
    sums_TN = act_TF.new_zeros(act_TF.shape[0], num_clusters).index_add_(
        1, assignment_F.to(act_TF.device), act_TF
    )
    return sums_TN / (act_TF.shape[1] // num_clusters) / xi


def cluster_targets(
    act_TF: torch.Tensor, assignment_F: torch.Tensor, num_clusters: int, xi: float = 1.0
) -> torch.Tensor:
    """`p_T = softmax(mean cluster activation / ξ)`, fp32 `[T, N]`."""
    return torch.softmax(cluster_scores(act_TF, assignment_F, num_clusters, xi), dim=-1)


def unpack_batch(batch: Mapping | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(input_ids [B, S], attention_mask [B, S] | None)` from a dict batch or a tensor of ids."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if "input_ids" not in batch:
        raise KeyError("a batch must be a tensor of token ids or a mapping with 'input_ids'")
    return batch["input_ids"], batch.get("attention_mask")


class ClusterScoreHooks:
    """Forward pre-hooks on the teacher's `down_proj`s that compute each student layer's cluster
    scores `[T, N]` on the fly (fp32, no grad), during any teacher forward.

    `scores[l]` holds student layer l's scores of the last forward; with `keep_activations`,
    `activations[l]` keeps the `[T, F]` activations too (statistics only).

    Example:
        >>> with ClusterScoreHooks(teacher, clusters) as hooks, torch.no_grad():
        ...     teacher(input_ids)
        >>> p_T = torch.softmax(hooks.scores[0], -1)
    """

    def __init__(
        self,
        teacher: nn.Module,
        clusters: TeacherClusters,
        *,
        xi: float = 1.0,
        keep_activations: bool = False,
    ) -> None:
        if xi <= 0:
            raise ValueError(f"xi must be > 0, got {xi}")
        self.clusters = clusters
        self.xi = xi
        self.keep_activations = keep_activations
        self.scores: list[torch.Tensor | None] = [None] * len(clusters)
        self.activations: list[torch.Tensor | None] = [None] * len(clusters)
        mlps = teacher_mlps(teacher)
        by_teacher: dict[int, list[int]] = {}
        for l, c in enumerate(clusters.layers):
            by_teacher.setdefault(c.teacher_layer, []).append(l)
        self._handles = [
            mlps[t].down_proj.register_forward_pre_hook(self._make_hook(students))
            for t, students in by_teacher.items()
        ]

    def _make_hook(self, student_layers: list[int]):
        def hook(_module, args):
            act_TF = args[0].detach()
            act_TF = act_TF.reshape(-1, act_TF.shape[-1])
            for l in student_layers:
                c = self.clusters.layers[l]
                self.scores[l] = cluster_scores(act_TF, c.assignment_F, c.num_clusters, self.xi)
                if self.keep_activations:
                    self.activations[l] = act_TF.float()

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ClusterScoreHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class NeuronStats:
    """Statistics of the teacher's FFN neurons on `D_A`, per student layer.

    Attributes:
        clusters: the clustering the statistics were computed for.
        importance_NF: per layer, fp32 importance of every neuron for every cluster (see module doc).
        mean_abs_F: per layer, fp32 `E_x |a_i(x)|`.
        mean_targets_N: per layer, fp32 mean of `p_T` over tokens (the teacher's cluster load).
        num_tokens: tokens seen (padding excluded).
        xi: the target temperature used.
    """

    clusters: TeacherClusters
    importance_NF: list[torch.Tensor]
    mean_abs_F: list[torch.Tensor]
    mean_targets_N: list[torch.Tensor]
    num_tokens: int
    xi: float = 1.0


@torch.no_grad()
def collect_stats(
    teacher: nn.Module,
    batches: Iterable[Mapping | torch.Tensor],
    clusters: TeacherClusters | None = None,
    *,
    num_experts: int | None = None,
    method: str = "kmeans",
    xi: float = 1.0,
    seed: int = 0,
    max_batches: int | None = None,
) -> NeuronStats:
    """Stream the teacher over `batches` of `D_A` and accumulate per-neuron statistics.

    Args:
        teacher: the dense teacher (eval mode is used; its mode is restored).
        batches: token-id tensors `[B, S]` or dicts with `input_ids` (and `attention_mask`).
        clusters: the neuron clustering; when None it is computed here with
            `cluster_teacher(teacher, num_experts, method=method, seed=seed)`.
        num_experts: N, needed only when `clusters` is None.
        method: "kmeans" (for `decompress(init="cluster")`) or "random" (for
            `init="random_split"`), used only when `clusters` is None.
        xi: temperature ξ of the cluster targets.
        max_batches: stop after this many batches.

    Returns:
        `NeuronStats` (holding `clusters`), the input of `decompress(..., stats=...)`.
    """
    if clusters is None:
        if num_experts is None:
            raise ValueError("collect_stats needs `clusters` or `num_experts`")
        clusters = cluster_teacher(teacher, num_experts, method=method, seed=seed)
    mlps = teacher_mlps(teacher)
    n = clusters.num_experts
    device = mlps[0].down_proj.weight.device
    num_layers = len(clusters)
    coact_NF = [None] * num_layers
    weight_N = [torch.zeros(n, device=device) for _ in range(num_layers)]
    abs_F = [None] * num_layers
    tokens = 0
    was_training = teacher.training
    teacher.eval()
    try:
        with ClusterScoreHooks(teacher, clusters, xi=xi, keep_activations=True) as hooks:
            for b, batch in enumerate(batches):
                if max_batches is not None and b >= max_batches:
                    break
                input_ids, attention_mask = unpack_batch(batch)
                input_ids = input_ids.to(device)
                mask = attention_mask.to(device) if attention_mask is not None else None
                teacher(input_ids=input_ids, attention_mask=mask, use_cache=False)
                keep_T = (mask.reshape(-1) > 0) if mask is not None else None
                for l in range(num_layers):
                    act_TF, p_TN = hooks.activations[l].abs(), torch.softmax(hooks.scores[l], -1)
                    if keep_T is not None:
                        act_TF, p_TN = act_TF[keep_T], p_TN[keep_T]
                    coact_NF[l] = p_TN.T @ act_TF + (0 if coact_NF[l] is None else coact_NF[l])
                    abs_F[l] = act_TF.sum(0) + (0 if abs_F[l] is None else abs_F[l])
                    weight_N[l] += p_TN.sum(0)
                tokens += int(keep_T.sum()) if keep_T is not None else input_ids.numel()
                hooks.activations = [None] * num_layers
    finally:
        teacher.train(was_training)
    if tokens == 0:
        raise ValueError("collect_stats saw no tokens: `batches` is empty or fully masked")
    importance, mean_abs, mean_targets = [], [], []
    for l, c in enumerate(clusters.layers):
        down_norm_F = mlps[c.teacher_layer].down_proj.weight.float().norm(dim=0)
        importance.append(coact_NF[l] / weight_N[l].clamp_min(1e-12).unsqueeze(1) * down_norm_F)
        mean_abs.append(abs_F[l] / tokens)
        mean_targets.append(weight_N[l] / tokens)
    return NeuronStats(clusters, importance, mean_abs, mean_targets, tokens, xi)
