"""Optional teacher preparation: plain GRPO on the dense teacher before distillation.

It is the same loop as PADD with every PADD stage off: a dense model has no router (no drift,
no bias) and there is no teacher to distil from, so only the clipped GRPO surrogate (and the
optional reference KL) remain; the free functions of `objectives` are shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from padd.data.problem import Problem

from .config import PADDConfig, preset
from .prompts import prompt_batches
from .trainer import PADDTrainer

__all__ = ["teacher_grpo_config", "train_teacher_grpo"]


def teacher_grpo_config(**overrides) -> PADDConfig:
    """`vanilla_grpo` settings for a dense model (`num_iterations=1`: no router drift to refine;
    `dynamic_sampling=1`: `train_teacher_grpo` updates on every prompt it draws)."""
    return preset("vanilla_grpo", **{"num_iterations": 1, "dynamic_sampling": 1, **overrides})


def train_teacher_grpo(
    teacher,
    tokenizer,
    problems: Sequence[Problem],
    *,
    steps: int,
    prompts_per_step: int = 8,
    config: PADDConfig | None = None,
    log: Callable[[dict], None] | None = None,
    reward_fn: Callable[[str, Problem], float] | None = None,
) -> list[dict]:
    """Run `steps` GRPO steps on `teacher` in place, sampling prompts from `problems`.

    Prompts come in seeded epochs (`prompts.prompt_batches` with `config.seed`, as the
    pipeline's training draws them). `reward_fn` as in `PADDTrainer`. Returns the per-step
    metrics (each also passed to `log` when given).
    """
    config = config or teacher_grpo_config()
    if config.use_kd or config.use_bias or config.drift_on != "none":
        raise ValueError("teacher GRPO runs without KD, drift or bias: use teacher_grpo_config()")
    if not problems:
        raise ValueError("train_teacher_grpo needs at least one problem")
    trainer = PADDTrainer(teacher, None, tokenizer, config, reward_fn=reward_fn)
    batches = prompt_batches(problems, prompts_per_step, config.seed)
    history = []
    for _ in range(steps):
        metrics = trainer.step(next(batches))
        history.append(metrics)
        if log is not None:
            log(metrics)
    return history
