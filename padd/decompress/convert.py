"""`decompress(teacher, N, k)`: build a transformers MoE student from a dense teacher.

The student is a new model (the teacher is never modified): Llama/Mistral → Mixtral,
Qwen2 → Qwen2-MoE (shared expert of width 0), Qwen3 → Qwen3-MoE. Embeddings, attention, norms
and LM head are copied; every MLP becomes N experts of width `d_ff / k` with top-k routing, so
the active FFN FLOPs equal the teacher's plus the router (`2·d·N` per token and layer). It
saves with `save_pretrained` and loads with plain `AutoModelForCausalLM`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from padd.moe.experts_layout import check_fused_swiglu

from .architectures import DecompressionError, check_teacher_config, student_config
from .experts import (
    expert_weights,
    plan_cluster_experts,
    plan_upcycled_experts,
    random_router,
    router_from_centroids,
)
from .neurons import TeacherClusters, cluster_teacher, teacher_mlps
from .stats import NeuronStats
from .tied_groups import GROUP_SIZE_KEY, plan_tied_group_experts, tie_rows

__all__ = ["INITS", "clustering_method", "decompress", "moe_blocks"]

INITS = ("exact", "cluster", "random_split", "upcycle")


def decompress(
    teacher: PreTrainedModel,
    num_experts: int,
    top_k: int,
    stats: NeuronStats | None = None,
    *,
    init: str = "cluster",
    seed: int = 0,
    clusters: TeacherClusters | None = None,
    fill: bool = True,
    rescale: str = "expected",
    router_scale: float = 1.0,
    features: str = "gate",
) -> PreTrainedModel:
    """Decompress a dense gated-MLP teacher into an N-expert, top-k transformers MoE student.

    Args:
        teacher: Llama, Mistral, Qwen2 or Qwen3 causal LM (any device/dtype; not modified).
        num_experts: N, must divide `d_ff`.
        top_k: k ≤ N, must divide `d_ff` (expert width `d_ff / k`).
        stats: `collect_stats(teacher, D_A batches, ...)`: its clustering is used and its
            neuron importance picks the fill neurons. Without it the fill falls back to the
            data-free proxy (gate-row similarity to the cluster centroid). Ignored by "upcycle".
        init: "exact" (tied groups of k experts, each group a partition of the k-means
            clusters: the student equals the teacher for any router; see
            `padd.decompress.tied_groups`), "cluster" (balanced k-means cores filled by
            importance, rescaled in expectation: the earlier construction, not
            function-preserving), "random_split" (random balanced neuron split, then the same
            fill and router init) or "upcycle" (sparse upcycling: experts are slices/copies of
            the FFN, random router).
        seed: clustering / random-router seed.
        clusters: a precomputed `cluster_teacher(...)` result (else from `stats`, else computed).
        fill: False keeps only the core clusters (width `d_ff / N`): the experts then partition
            the teacher's neurons (function-preservation checks; not FLOPs-matched unless k = N).
        rescale: down-projection rescaling, "expected" (`s_i = N / m_i`, see
            `padd.decompress.experts`) or "none".
        router_scale: factor on the centroid router init.
        features: neuron rows for clustering, "gate" or "gate_up".

    Returns:
        The student (eval mode, teacher's dtype and device), a standard transformers model.

    Raises:
        DecompressionError: unsupported architecture, non-gated MLP, `d_ff % N`, `d_ff % k`,
            `k > N`, unknown init, stats/clusters of another method or shape; all before any
            compute.

    Example:
        >>> stats = collect_stats(teacher, batches_DA, num_experts=8)
        >>> student = decompress(teacher, 8, 2, stats)
        >>> student.save_pretrained("student")  # AutoModelForCausalLM.from_pretrained works
    """
    check_teacher_config(teacher.config, num_experts, top_k, fill=fill)
    if init not in INITS:
        raise DecompressionError(f"init must be one of {INITS}, got {init!r}")
    if init == "exact" and (num_experts % top_k or not fill):
        raise DecompressionError(
            f"init='exact' needs top_k to divide num_experts (groups of k experts), got N={num_experts}, "
            f"k={top_k}" + ("" if fill else ", and fill=True")
        )
    mlps = teacher_mlps(teacher)
    d_ff = teacher.config.intermediate_size
    width = d_ff // top_k if fill else d_ff // num_experts
    if init != "upcycle":
        clusters = _resolve_clusters(teacher, num_experts, init, stats, clusters, seed, features)

    cfg = student_config(teacher.config, num_experts, top_k, width)
    param = next(teacher.parameters())
    with warnings.catch_warnings():
        # Qwen2-MoE's width-0 shared expert: torch warns that initialising it is a no-op.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        # Built directly on the teacher's device: no host copy of a model N/k times the FFN size.
        with torch.device(param.device):
            student = AutoModelForCausalLM.from_config(cfg, dtype=param.dtype)
    _copy_shared_weights(teacher, student)
    hidden = teacher.config.hidden_size
    with torch.no_grad():
        for l, block in enumerate(moe_blocks(student)):
            if init == "exact":
                plan = plan_tied_group_experts(clusters[l], top_k, seed=seed + l)
                # Distinct group rows (a cluster centroid each): exact ties would leave the choice
                # between groups to torch.topk's unspecified order in transformers' own router.
                router = tie_rows(
                    router_from_centroids(clusters[l], router_scale)[: num_experts // top_k], top_k
                )
            elif init == "upcycle":
                plan = plan_upcycled_experts(d_ff, num_experts, top_k, rescale=rescale)
                std = teacher.config.initializer_range
                router = random_router(num_experts, hidden, std, seed + l)
            else:
                importance = stats.importance_NF[l] if stats is not None else None
                plan = plan_cluster_experts(
                    clusters[l],
                    width,
                    importance,
                    fill_proxy_HF=mlps[l].gate_proj.weight.T,
                    rescale=rescale,
                )
                router = router_from_centroids(clusters[l], router_scale)
            gate_up, down = _expert_weights_checked(mlps[l], plan, block)
            block.experts.gate_up_proj.copy_(gate_up)
            block.experts.down_proj.copy_(down)
            block.gate.weight.copy_(router.to(block.gate.weight))
            if hasattr(block, "shared_expert_gate"):
                block.shared_expert_gate.weight.zero_()
    if init == "exact":  # saved in config.json: training keeps these router rows tied
        setattr(student.config, GROUP_SIZE_KEY, top_k)
    return student.eval()


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse MoE block (`gate` router + fused `experts`) of every decoder layer, in order."""
    blocks = []
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "gate") and hasattr(getattr(mlp, "experts", None), "gate_up_proj"):
            blocks.append(mlp)
    return blocks


def clustering_method(init: str) -> str:
    """The neuron clustering (`collect_stats(method=...)`) that construction `init` is built from:
    random balanced partitions for `random_split`, balanced k-means for every other."""
    return "random" if init == "random_split" else "kmeans"


def _resolve_clusters(teacher, num_experts, init, stats, clusters, seed, features) -> TeacherClusters:
    method = clustering_method(init)
    if clusters is not None and stats is not None and stats.clusters is not clusters:
        raise DecompressionError(
            "pass `stats` or `clusters`, not both: stats carry the clustering they were computed for"
        )
    if clusters is None and stats is not None:
        clusters = stats.clusters
    if clusters is None:
        return cluster_teacher(teacher, num_experts, method=method, seed=seed, features=features)
    if clusters.method != method:
        raise DecompressionError(
            f"init={init!r} needs {method!r} clusters, but the given stats/clusters used {clusters.method!r} "
            f"(compute them with collect_stats(..., method={method!r}))"
        )
    if clusters.num_experts != num_experts or len(clusters) != teacher.config.num_hidden_layers:
        raise DecompressionError(
            f"clusters hold {clusters.num_experts} experts x {len(clusters)} layers; expected "
            f"{num_experts} x {teacher.config.num_hidden_layers}"
        )
    return clusters


def _expert_weights_checked(mlp, plan, block):
    """The planned experts in `expert_weights`' layout, which must be the student's own: the
    flags decide it (a transposed [N, H, 2W] has the same shape as [N, 2W, H] when H = 2W)."""
    check_fused_swiglu(block.experts)
    gate_up, down = expert_weights(mlp, plan)
    for got, live in ((gate_up, block.experts.gate_up_proj), (down, block.experts.down_proj)):
        if got.shape != live.shape:
            raise RuntimeError(f"expert weights {tuple(got.shape)} != {tuple(live.shape)}")
    return gate_up, down


@torch.no_grad()
def _copy_shared_weights(teacher: nn.Module, student: nn.Module) -> None:
    """Copy every non-MLP tensor by name; every non-MLP student tensor must be covered."""
    src = {k: v for k, v in teacher.state_dict().items() if ".mlp." not in k}
    dst = {k: v for k, v in student.state_dict().items() if ".mlp." not in k}
    missing = sorted(set(dst) - set(src))
    if missing:
        raise DecompressionError(f"student tensors with no teacher counterpart: {missing[:5]}")
    for name, tensor in dst.items():
        if tensor.shape != src[name].shape:
            raise DecompressionError(
                f"{name}: teacher {tuple(src[name].shape)} vs student {tuple(tensor.shape)}"
            )
        tensor.copy_(src[name])
