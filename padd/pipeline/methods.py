"""The training methods a run names (`training.method`, `compare.methods`) and the `padd.training`
settings each one trains with.

Its own module because the checks before compute (`padd.pipeline.inputs.preflight`) and the steps
that train (`train`, `compare`) both need it: neither imports the other.
"""

from __future__ import annotations

from typing import Any

from padd.config import PADDRunConfig
from padd.training.config import PRESETS, PADDConfig, preset

# The paper's "Teacher (GRPO)" row: the Stages II–IV loop on the dense teacher itself.
DENSE_TEACHER_METHOD = "teacher_grpo"
# The dense teacher after the Stage I warmup's supervised steps on D_B (a `--compare` row only).
DENSE_SFT_METHOD = "teacher_sft"

# `--compare` methods that build their own Stage-I student (the config changes they make), then
# train it with the run's `training.method`.
STAGE1_ABLATIONS: dict[str, dict[str, Any]] = {
    "no_stage1": {"skip": True, "init": "upcycle"},
    "cluster_init": {"init": "cluster"},
    "upcycle": {"init": "upcycle"},
    "random_split": {"init": "random_split"},
}


def training_config(method: str, params: dict[str, Any], seed: int, router_weight: float = 0.0) -> PADDConfig:
    """The `padd.training` preset `method` with the run's `params` (`training.params`) on top.

    A preset's own switches win over the run's params: those define the baseline or ablation, so
    a run that tunes PADD (say `kd_on` or `drift_on`) compares it with the standard baselines,
    not with baselines changed the same way. Everything a preset leaves alone (learning rate,
    rollouts, scales) comes from `params`. `router_weight` (the run's `router.weight`, 0 when
    `router.objective` is none) likewise applies where the preset does not switch teacher-guided
    routing off (the baselines do); the seed is the run's unless `params` set one."""
    pinned = PRESETS.get(method, {})
    return preset(method, **{"seed": seed, "router_weight": router_weight, **params, **pinned})


def run_router_weight(cfg: PADDRunConfig) -> float:
    """The Stages II–IV router weight a run's config asks for."""
    return cfg.router.weight if cfg.router.objective != "none" else 0.0
