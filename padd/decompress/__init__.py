"""padd.decompress: Stage I, a dense teacher decompressed into a transformers MoE student.

- `cluster_teacher` / `balanced_kmeans`: teacher FFN neurons into N balanced clusters.
- `collect_stats`: streamed activation statistics on `D_A` (neuron importance, cluster targets).
- `decompress`: the student (Llama/Mistral → Mixtral, Qwen2 → Qwen2-MoE, Qwen3 → Qwen3-MoE),
  with the "exact" (tied groups, equal to the teacher for any router), "cluster",
  "random_split" and "upcycle" initialisations.
- `fit_sequence_targets` / `fit_group_router`: the teacher's sequence clusters as routing
  targets of a tied-group student, and the router fitted to them.
- `init_pretrained_student`: the paper's setting, an existing MoE student's router fitted to the
  teacher's cluster scores.
- `warmup`: Stage I warmup on `D_B` (uniform frozen routing, `L_LM + α·L_KD + β·L_init`).

The package itself is callable: `padd.decompress(teacher, N, k, ...)` is `decompress(...)`, while
`padd.decompress.collect_stats` etc. stay reachable (a function named like the package would
shadow it).
"""

import sys
import types

from .all_experts import all_experts_active
from .architectures import SUPPORTED_TEACHERS, DecompressionError, check_teacher_config, student_config
from .clustering import ClusterResult, balanced_kmeans, clustering_objective, random_balanced_split
from .convert import INITS, clustering_method, decompress, moe_blocks
from .experts import ExpertPlan, plan_cluster_experts, plan_upcycled_experts
from .neurons import LayerClusters, TeacherClusters, cluster_teacher, layer_map, teacher_mlps
from .pretrained import PretrainedInit, init_pretrained_student, match_clusters_to_experts
from .sequence_targets import SequenceRouterTargets, fit_group_router, fit_sequence_targets
from .stats import ClusterScoreHooks, NeuronStats, cluster_scores, cluster_targets, collect_stats
from .tied_groups import plan_tied_group_experts
from .warmup import warmup, warmup_losses

__all__ = [
    "INITS",
    "clustering_method",
    "SUPPORTED_TEACHERS",
    "ClusterResult",
    "ClusterScoreHooks",
    "DecompressionError",
    "ExpertPlan",
    "LayerClusters",
    "NeuronStats",
    "PretrainedInit",
    "SequenceRouterTargets",
    "TeacherClusters",
    "all_experts_active",
    "balanced_kmeans",
    "check_teacher_config",
    "cluster_scores",
    "cluster_targets",
    "cluster_teacher",
    "clustering_objective",
    "collect_stats",
    "decompress",
    "fit_group_router",
    "fit_sequence_targets",
    "init_pretrained_student",
    "layer_map",
    "match_clusters_to_experts",
    "moe_blocks",
    "plan_cluster_experts",
    "plan_tied_group_experts",
    "plan_upcycled_experts",
    "random_balanced_split",
    "student_config",
    "teacher_mlps",
    "warmup",
    "warmup_losses",
]


class _CallablePackage(types.ModuleType):
    """`padd.decompress(...)` calls `decompress`; attribute access is the package's."""

    def __call__(self, *args, **kwargs):
        return decompress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
