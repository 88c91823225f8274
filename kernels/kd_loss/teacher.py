"""The teacher kinds `fused_linear_kd_loss` (and its reference) accept besides a logits tensor.

Shape legend: N token rows, V vocabulary, Ht teacher hidden size, K sparse teacher support.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TeacherHead(NamedTuple):
    """A teacher given by its last hidden states and LM head: logits = hidden @ weight^T + bias."""

    hidden: torch.Tensor  # [N, Ht]
    weight: torch.Tensor  # [V, Ht]
    bias: torch.Tensor | None = None  # [V]


class SparseTeacher(NamedTuple):
    """A cached top-K teacher: `ids [N, K]` (distinct per row) and their log-probs `[N, K]`.

    Used as p = softmax(logprobs / tau_T) over the K ids, i.e. renormalised over its support
    and zero elsewhere, against the student's full-vocabulary q. forward_kl is then the
    soft-target cross-entropy on the support minus the teacher entropy; jsd and the skews stay
    finite; reverse_kl is infinite (q > 0 off the support) and is refused.
    """

    ids: torch.Tensor  # [N, K] integer, in [0, V)
    logprobs: torch.Tensor  # [N, K]
