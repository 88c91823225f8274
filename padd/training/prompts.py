"""Which prompts each training step sees: the one prompt sampler of Stages II–IV (the pipeline's
training of a student, or of the dense teacher for `teacher_grpo`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

__all__ = ["prompt_batches"]

T = TypeVar("T")


def prompt_batches(problems: Sequence[T], per_step: int, seed: int, start: int = 0) -> Iterator[list[T]]:
    """The prompts of each step from `start` on: epochs of seeded permutations of `problems`.

    Step `s` takes items `s·per_step … (s+1)·per_step − 1` of the concatenated epochs, so every
    problem is seen once per epoch and a batch is a pure function of its step index: a run
    resumed at `start` draws exactly the batches of an uninterrupted one.
    """
    if not problems:
        raise ValueError("prompt_batches needs at least one problem")
    if per_step < 1:
        raise ValueError(f"per_step must be >= 1, got {per_step}")
    n = len(problems)
    step, epoch_of_perm, perm = start, None, None
    while True:
        batch = []
        for j in range(step * per_step, (step + 1) * per_step):
            epoch, pos = divmod(j, n)
            if epoch != epoch_of_perm:  # one generator per epoch: the same order from any step
                g = torch.Generator().manual_seed(seed * 100_003 + epoch)
                epoch_of_perm, perm = epoch, torch.randperm(n, generator=g).tolist()
            batch.append(problems[perm[pos]])
        yield batch
        step += 1
