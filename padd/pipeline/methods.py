"""The training methods a run names (`training.method`, `compare.methods`) and the `padd.training`
settings each one trains with.

Its own module because the checks before compute (`padd.pipeline.inputs.preflight`) and the steps
that train (`train`, `compare`) both need it: neither imports the other. The method names
themselves are checked by the config (`padd.config`), where the Stage-I ablations are declared.
"""

from __future__ import annotations

import dataclasses

from padd.config import DENSE_SFT_METHOD, STAGE1_ABLATIONS, PADDRunConfig, Stage1Ablation
from padd.training.config import PRESETS, LoopParams, PADDConfig, preset

__all__ = [
    "DENSE_SFT_METHOD",
    "DENSE_TEACHER_METHOD",
    "STAGE1_ABLATIONS",
    "Stage1Ablation",
    "run_router_weight",
    "training_config",
]

# The paper's "Teacher (GRPO)" row: the Stages II–IV loop on the dense teacher itself.
DENSE_TEACHER_METHOD = "teacher_grpo"


def training_config(method: str, params: LoopParams, seed: int, router_weight: float = 0.0) -> PADDConfig:
    """The `padd.training` preset `method` with the run's `params` (`training.params`) under it.

    A preset's own switches win over the run's params: those define the baseline or ablation, so
    a run that tunes PADD (say `kd_on` or `drift_on`) compares it with the standard baselines,
    not with baselines changed the same way. Everything a preset leaves alone (learning rate,
    rollouts, scales) comes from `params`. `router_weight` (the run's `router.weight`, 0 when
    `router.objective` is none) likewise applies where the preset does not switch teacher-guided
    routing off (the baselines do); the seed is the run's (`run.seed`)."""
    own = {"seed": seed, "router_weight": router_weight}
    return preset(method, **{**dataclasses.asdict(params), **own, **PRESETS.get(method, {})})


def run_router_weight(cfg: PADDRunConfig) -> float:
    """The Stages II–IV router weight a run's config asks for."""
    return cfg.router.weight if cfg.router.objective != "none" else 0.0
