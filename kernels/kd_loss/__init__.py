"""Knowledge-distillation losses (KL family, per-token temperature).

PLACEHOLDER owned by the KD-kernel work: a reference-only `kd_loss` so that callers can be
written against the final signature. Replaced by the full kernels + reference.
"""

from __future__ import annotations

import torch

__all__ = ["kd_loss"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float | torch.Tensor = 1.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    s = torch.log_softmax(student_logits.float(), -1)
    t_temp = temperature if not isinstance(temperature, torch.Tensor) else temperature.float().unsqueeze(-1)
    t = torch.log_softmax(teacher_logits.float() / t_temp, -1)
    if divergence == "forward_kl":
        per = (t.exp() * (t - s)).sum(-1)
    elif divergence == "reverse_kl":
        per = (s.exp() * (s - t)).sum(-1)
    else:
        raise NotImplementedError(divergence)
    if mask is not None:
        per = per * mask.float()
        n = mask.float().sum().clamp_min(1)
    else:
        n = per.new_tensor(max(per.numel(), 1))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / n
