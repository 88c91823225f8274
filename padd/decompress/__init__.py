"""padd.decompress: Stage I, a dense teacher decompressed into a transformers MoE student.

- `cluster_teacher` / `balanced_kmeans`: teacher FFN neurons into N balanced clusters.
- `collect_stats`: streamed activation statistics on `D_A` (neuron importance, cluster targets).
- `decompress`: the student (Llama/Mistral → Mixtral, Qwen2 → Qwen2-MoE, Qwen3 → Qwen3-MoE),
  with the "cluster", "random_split" and "upcycle" initialisations.
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
from .convert import INITS, decompress, moe_blocks
from .experts import ExpertPlan, plan_cluster_experts, plan_upcycled_experts
from .neurons import LayerClusters, TeacherClusters, cluster_teacher, layer_map, teacher_mlps
from .pretrained import PretrainedInit, init_pretrained_student, match_clusters_to_experts
from .stats import ClusterScoreHooks, NeuronStats, cluster_scores, cluster_targets, collect_stats
from .warmup import warmup, warmup_losses

__all__ = [
    "INITS",
    "SUPPORTED_TEACHERS",
    "ClusterResult",
    "ClusterScoreHooks",
    "DecompressionError",
    "ExpertPlan",
    "LayerClusters",
    "NeuronStats",
    "PretrainedInit",
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
    "init_pretrained_student",
    "layer_map",
    "match_clusters_to_experts",
    "moe_blocks",
    "plan_cluster_experts",
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
