"""The teacher's FFN neurons: access to each layer's gated MLP, and their clustering per layer.

Shape legend: F = d_ff neurons, H hidden size, N clusters (= student experts).

Neuron i of a gated MLP `down(silu(gate x) * up x)` is row i of `gate_proj` and `up_proj` and
column i of `down_proj`; its activation `a_i(x)` is entry i of `down_proj`'s input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .clustering import ClusterResult, balanced_kmeans, random_balanced_split

__all__ = ["LayerClusters", "TeacherClusters", "cluster_teacher", "layer_map", "teacher_mlps"]


def teacher_mlps(model: nn.Module) -> list[nn.Module]:
    """The gated MLP (`gate_proj`, `up_proj`, `down_proj`) of every decoder layer, in order."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no `model.layers`: not a transformers decoder LM")
    mlps = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(
                f"layer {i} of {type(model).__name__} has no gated MLP (gate_proj/up_proj/down_proj)"
            )
        mlps.append(mlp)
    return mlps


def layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Student layer l takes teacher layer `floor(l · L_T / L_S)` (identity when equal)."""
    return [math.floor(l * num_teacher_layers / num_student_layers) for l in range(num_student_layers)]


@dataclass
class LayerClusters:
    """The clustering of one teacher layer's neurons, as used by one student layer.

    Attributes:
        teacher_layer: the teacher layer whose neurons are clustered.
        assignment_F: int64 cluster (= student expert) of each teacher neuron.
        centroids_NF: fp32 centroids in the normalised feature space of the clustering.
        router_NH: fp32 mean of the raw gate rows of each cluster: `router_NH @ x` is the mean
            gate pre-activation of the cluster's neurons, the natural router initialisation.
        objective: balanced k-means objective (normalised rows).
        random_objective: the objective of a random balanced split with the same seed.
    """

    teacher_layer: int
    assignment_F: torch.Tensor
    centroids_NF: torch.Tensor
    router_NH: torch.Tensor
    objective: float
    random_objective: float

    @property
    def num_clusters(self) -> int:
        return self.router_NH.shape[0]

    def members(self) -> torch.Tensor:
        """`[N, F/N]` neuron ids of each cluster, ascending."""
        order = torch.sort(self.assignment_F, stable=True).indices
        return order.view(self.num_clusters, -1)

    def permute(self, perm_N: torch.Tensor) -> LayerClusters:
        """Relabel: new cluster e is old cluster `perm_N[e]`."""
        inverse_N = torch.empty_like(perm_N)
        inverse_N[perm_N] = torch.arange(perm_N.numel(), device=perm_N.device)
        return LayerClusters(
            teacher_layer=self.teacher_layer,
            assignment_F=inverse_N.to(self.assignment_F.device)[self.assignment_F],
            centroids_NF=self.centroids_NF[perm_N.to(self.centroids_NF.device)],
            router_NH=self.router_NH[perm_N.to(self.router_NH.device)],
            objective=self.objective,
            random_objective=self.random_objective,
        )


@dataclass
class TeacherClusters:
    """Per student layer, the clustering of its teacher layer's neurons into N experts.

    Attributes:
        layers: one `LayerClusters` per student MoE layer.
        method: "kmeans" (balanced k-means) or "random" (random balanced split).
        features: "gate" or "gate_up" (what a neuron's row is).
        seed: the seed used.
    """

    layers: list[LayerClusters]
    method: str = "kmeans"
    features: str = "gate"
    seed: int = 0

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_clusters

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerClusters:
        return self.layers[layer]

    def summary(self) -> dict:
        """Mean objective of the clustering and of a random split, over layers."""
        n = len(self.layers)
        return {
            "method": self.method,
            "objective": sum(c.objective for c in self.layers) / n,
            "random_objective": sum(c.random_objective for c in self.layers) / n,
        }

    def save(self, path: str) -> None:
        """`torch.save` of plain tensors and numbers (reload with `TeacherClusters.load`)."""
        torch.save(
            {
                "layers": [vars(c) for c in self.layers],
                "method": self.method,
                "features": self.features,
                "seed": self.seed,
            },
            path,
        )

    @classmethod
    def load(cls, path: str) -> TeacherClusters:
        data = torch.load(path, weights_only=True)
        return cls(
            layers=[LayerClusters(**c) for c in data["layers"]],
            method=data["method"],
            features=data["features"],
            seed=data["seed"],
        )


METHODS = ("kmeans", "random")
FEATURES = ("gate", "gate_up")


@torch.no_grad()
def cluster_teacher(
    teacher: nn.Module,
    num_experts: int,
    *,
    method: str = "kmeans",
    features: str = "gate",
    seed: int = 0,
    num_student_layers: int | None = None,
    max_iter: int = 30,
) -> TeacherClusters:
    """Cluster each teacher layer's FFN neurons into `num_experts` equal groups.

    Args:
        teacher: a transformers dense causal LM with gated MLPs.
        num_experts: N; must divide the teacher's `d_ff`.
        method: "kmeans" (balanced k-means) or "random" (random balanced split, the baseline).
        features: the row of a neuron: its gate row ("gate", the method's default) or
            `[gate; up]` ("gate_up").
        seed: the clustering seed (layer l uses `seed + l`).
        num_student_layers: L_S when the student has a different depth (layer map
            `floor(l · L_T / L_S)`); default: the teacher's depth.
        max_iter: Lloyd iterations at most.

    Returns:
        `TeacherClusters`, one entry per student layer, with each layer's objective and that of
        a random split (so the gain of clustering is visible: `clusters.summary()`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    mlps = teacher_mlps(teacher)
    d_ff = mlps[0].gate_proj.weight.shape[0]
    if d_ff % num_experts:
        raise ValueError(f"d_ff={d_ff} is not divisible by num_experts={num_experts}")
    mapping = layer_map(num_student_layers or len(mlps), len(mlps))
    per_teacher_layer: dict[int, LayerClusters] = {}
    for t in sorted(set(mapping)):
        gate_FH = mlps[t].gate_proj.weight.detach().float()
        rows = gate_FH if features == "gate" else torch.cat([gate_FH, mlps[t].up_proj.weight.float()], dim=1)
        rand = random_balanced_split(rows, num_experts, seed=seed + t)
        res: ClusterResult = (
            rand
            if method == "random"
            else balanced_kmeans(rows, num_experts, seed=seed + t, max_iter=max_iter)
        )
        router_NH = gate_FH.new_zeros(num_experts, gate_FH.shape[1]).index_add_(0, res.assignment_F, gate_FH)
        per_teacher_layer[t] = LayerClusters(
            teacher_layer=t,
            assignment_F=res.assignment_F,
            centroids_NF=res.centroids_ND,
            router_NH=router_NH / (d_ff // num_experts),
            objective=res.objective,
            random_objective=rand.objective,
        )
    return TeacherClusters(
        layers=[per_teacher_layer[t] for t in mapping], method=method, features=features, seed=seed
    )
