"""Stage I warmup on `D_B`: routing frozen and uniform, loss `L_LM + α·L_KD + β·L_init`.

Shape legend: B batch, S sequence, T = B·S tokens, V vocabulary, E experts, L MoE layers.

- Routing: `RoutingControl(student, mode="uniform")`, round-robin slots with weights 1/k, so
  every expert gets the same number of tokens and the same training signal, whatever the
  router says. The router parameters still learn, from `L_init` alone.
- `L_LM`: transformers' causal-LM loss on `labels`.
- `L_KD = KL(p_T ‖ p_S)` over the vocabulary (`padd.kernels.kd_loss`, forward KL by default)
  on every non-padding position.
- `L_init = Σ_l KL(p_S,l ‖ p_T,l)`: the router's softmax vs the teacher's cluster targets
  `softmax(mean cluster activation / ξ)` of the same token, i.e. `kd_loss(router_logits,
  cluster_scores, divergence="reverse_kl")` per layer (the fused KD kernel with E classes).
  For a tied-group student (`init="exact"`) the targets are the teacher's sequence clusters
  instead (`router_targets`, `padd.decompress.sequence_targets`), the same for every layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from padd.kernels import kd_loss
from padd.moe.router_groups import TiedRouterGroups
from padd.moe.routing_control import RoutingControl

from .convert import moe_blocks
from .neurons import TeacherClusters
from .sequence_targets import SequenceRouterTargets, prompt_mean, sft_prompt_mask
from .stats import ClusterScoreHooks

__all__ = ["warmup", "warmup_losses"]


def warmup(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping | torch.Tensor],
    clusters: TeacherClusters | None,
    *,
    steps: int,
    lr: float = 1e-4,
    alpha: float = 1.0,
    beta: float = 1.0,
    xi: float = 1.0,
    kd_divergence: str = "forward_kl",
    kd_temperature: float = 1.0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
    log: Callable[[dict], None] | None = None,
    trainable: str = "all",
    router_targets: SequenceRouterTargets | None = None,
    routing: str = "uniform",
    teacher_cache_mb: float = 256.0,
) -> list[dict]:
    """Run `steps` warmup steps on `batches` (cycled) and return per-step metrics.

    Args:
        student: a transformers MoE student (e.g. from `decompress` or
            `init_pretrained_student`); trained in place.
        teacher: the dense teacher (frozen, eval mode, no grad).
        batches: dicts with `input_ids [B, S]` and optionally `attention_mask` and `labels`
            (default: the ids, padding set to -100), or plain id tensors. A re-iterable (list,
            DataLoader) is gone through again when shorter than `steps`; an iterator (e.g. an
            endless generator) is read once and must yield `steps` batches.
        clusters: the teacher clustering the student was built from (one entry per MoE layer);
            its per-token cluster scores are the `L_init` targets unless `router_targets`.
        steps: optimiser steps.
        lr, weight_decay: AdamW settings, used when `optimizer` is None.
        alpha, beta: weights of `L_KD` and `L_init` (the method's defaults: 1, 1).
        xi: temperature of the teacher cluster targets.
        kd_divergence, kd_temperature: of `L_KD` (see `padd.kernels.kd_loss`). A teacher with a
            larger (padded) vocabulary is cut to the student's.
        max_grad_norm: gradient clipping (None: off).
        log: called with each step's metrics as soon as the step is done.
        trainable: "all" (every parameter that requires grad) or "moe" (experts and routers
            only; embeddings, attention and norms, copied from the teacher, stay fixed).
            Ignored when `optimizer` is given.
        router_targets: the teacher's sequence clusters (tied-group students): `L_init`
            targets shared by every layer; the router rows stay tied.
        routing: "uniform" (the method: frozen round-robin, equal signal to every expert) or
            "learned" (the router's own top-k, so experts specialise from the warmup on).
        teacher_cache_mb: when `batches` is a list or tuple, the frozen teacher's outputs for
            each batch (its logits and the `L_init` targets) are kept after their first pass and
            reused when the warmup comes round to that batch again, up to this many MB in all
            (0: off). Bit-identical to recomputing them; it saves one teacher forward a step.

    Returns:
        One dict per step: `step`, `loss`, `lm`, `kd`, `init`, `grad_norm`, `load_cv` (coefficient
        of variation of the expert loads, 0 when routing is exactly uniform), `skipped` (a
        non-finite loss or gradient: the update was dropped).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not teacher_cache_mb >= 0:
        raise ValueError(f"teacher_cache_mb must be >= 0, got {teacher_cache_mb}")
    params = _trainable(student, trainable)
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    teacher.eval()
    student.train()
    history = []
    if clusters is None and router_targets is None:
        raise ValueError("warmup needs `clusters` or `router_targets` for its L_init targets")
    with RoutingControl(student, mode=routing, capture=True) as control, TiedRouterGroups(student):
        if router_targets is None:
            _check_layers(control, clusters)
            targets = ClusterScoreHooks(teacher, clusters, xi=xi)
        else:
            targets = _SequenceTargets(router_targets, control.num_layers)
        cache = TeacherOutputCache(teacher_cache_mb) if isinstance(batches, Sequence) else None
        with targets:
            for step, batch in zip(range(steps), _repeat(batches), strict=False):
                losses = warmup_losses(
                    student, teacher, batch, control, targets,
                    alpha=alpha, beta=beta, kd_divergence=kd_divergence, kd_temperature=kd_temperature,
                    cache=cache, cache_key=step % len(batches) if cache is not None else None,
                )  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                norm = _grad_norm(params, max_grad_norm)
                skipped = not (math.isfinite(norm) and math.isfinite(float(losses["loss"].detach())))
                if skipped:  # a non-finite update never reaches the weights or Adam's moments
                    optimizer.zero_grad(set_to_none=True)
                else:
                    optimizer.step()
                history.append(
                    {"step": step, **{k: float(v.detach()) for k, v in losses.items()}, "grad_norm": norm,
                     "load_cv": _load_cv(control), "skipped": skipped}
                )  # fmt: skip
                if log is not None:
                    log(history[-1])
    student.eval()
    return history


class _SequenceTargets:
    """`ClusterScoreHooks`' interface (`scores`: L × `[T, E]` target logits) for sequence targets,
    set from the final hidden states of the teacher forward that `warmup_losses` runs anyway."""

    def __init__(self, targets: SequenceRouterTargets, num_layers: int):
        self.targets, self.num_layers = targets, num_layers
        self.scores: list[torch.Tensor] = []

    def set_from_hidden(self, hidden_BSH: torch.Tensor, prompt_mask_BS: torch.Tensor) -> None:
        log_BE = self.targets.expert_log_targets(prompt_mean(hidden_BSH, prompt_mask_BS))
        self.scores = [log_BE.repeat_interleave(hidden_BSH.shape[1], dim=0)] * self.num_layers

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.scores = []


@dataclass
class _TeacherOutputs:
    logits_BSV: torch.Tensor
    scores: list[torch.Tensor]  # the `L_init` target logits of each student layer


class TeacherOutputCache:
    """The frozen teacher's outputs per warmup batch, kept within a memory budget.

    The warmup goes round its batches many times (e.g. 120 steps over 13 batches) and the
    teacher never changes, so its forward on a batch it has seen is recomputation. Entries past
    the budget are not kept: those batches run the teacher each time, as without a cache.
    """

    def __init__(self, budget_mb: float) -> None:
        self.budget_bytes = int(budget_mb * 2**20)
        self.used_bytes = 0
        self._entries: dict[int, _TeacherOutputs] = {}

    def get(self, key: int) -> _TeacherOutputs | None:
        return self._entries.get(key)

    def put(self, key: int, outputs: _TeacherOutputs) -> None:
        size = sum(t.numel() * t.element_size() for t in (outputs.logits_BSV, *outputs.scores))
        if self.used_bytes + size <= self.budget_bytes:
            self._entries[key] = outputs
            self.used_bytes += size


def warmup_losses(
    student: nn.Module,
    teacher: nn.Module,
    batch: Mapping | torch.Tensor,
    control: RoutingControl,
    targets: ClusterScoreHooks | _SequenceTargets,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    kd_divergence: str = "forward_kl",
    kd_temperature: float = 1.0,
    cache: TeacherOutputCache | None = None,
    cache_key: int | None = None,
) -> dict[str, torch.Tensor]:
    """One batch's `{"loss", "lm", "kd", "init"}` (graph kept on "loss").

    `control` must capture router logits (and set the routing mode), `targets` must be hooked on
    `teacher`; both are left to the caller so that evaluation can reuse this function. With a
    `cache`, the teacher's outputs for `cache_key` are reused when present and stored otherwise.
    """
    device = next(student.parameters()).device
    input_ids, attention_mask, labels = _unpack(batch, device)
    if isinstance(targets, _SequenceTargets):  # checked before any compute
        raw = batch if isinstance(batch, Mapping) else {"input_ids": batch}  # labels as given
        prompt_mask_BS = sft_prompt_mask(raw).to(device)
        if not prompt_mask_BS.any():
            raise ValueError("sequence router targets need prompt positions (labels == -100)")
    cached = cache.get(cache_key) if cache is not None else None
    if cached is not None:
        teacher_logits, target_scores = cached.logits_BSV, cached.scores
    else:
        with torch.no_grad():
            # One teacher pass: its final hidden states give both the KD logits and, for sequence
            # targets, the prompt features (the same `lm_head(decoder(x))` as `teacher(x).logits`).
            hidden_BSH = teacher.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            teacher_logits = teacher.get_output_embeddings()(hidden_BSH)
            if isinstance(targets, _SequenceTargets):
                targets.set_from_hidden(hidden_BSH, prompt_mask_BS)
        target_scores = list(targets.scores)
        if cache is not None:
            cache.put(cache_key, _TeacherOutputs(teacher_logits, target_scores))
    out = student(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        output_router_logits=False,
        use_cache=False,
    )
    keep_T = attention_mask.reshape(-1) if attention_mask is not None else None
    vocab = out.logits.shape[-1]
    if teacher_logits.shape[-1] < vocab:
        raise ValueError(f"teacher vocabulary {teacher_logits.shape[-1]} < student vocabulary {vocab}")
    # A larger teacher vocabulary is padding (e.g. Qwen2.5's 152064 vs Qwen3's 151936 rows).
    teacher_logits = teacher_logits[..., :vocab]
    kd = kd_loss(
        out.logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab).to(device),
        divergence=kd_divergence,
        temperature=kd_temperature,
        mask=keep_T,
    )
    init = out.logits.new_zeros((), dtype=torch.float32)
    for logits_TE, scores_TN in zip(control.router_logits, target_scores, strict=True):
        # KL(p_S || p_T): "reverse" from kd_loss's teacher-first point of view.
        init = init + kd_loss(logits_TE, scores_TN.to(device), divergence="reverse_kl", mask=keep_T)
    loss = out.loss + alpha * kd + beta * init
    return {"loss": loss, "lm": out.loss.detach(), "kd": kd.detach(), "init": init.detach()}


TRAINABLE = ("all", "moe")


def _trainable(student: nn.Module, trainable: str) -> list[torch.Tensor]:
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if trainable == "all":
        return [p for p in student.parameters() if p.requires_grad]
    return [p for block in moe_blocks(student) for p in block.parameters() if p.requires_grad]


def _repeat(batches: Iterable) -> Iterator:
    """Endless batches: re-iterate a re-iterable; read an iterator once, without caching it."""
    if iter(batches) is batches:
        yield from batches
        raise ValueError("`batches` (an iterator) ran out before `steps`; pass a list or a re-iterable")
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("`batches` is empty")


def _unpack(batch, device):
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch.get("attention_mask")
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels.to(device)


def _check_layers(control: RoutingControl, clusters: TeacherClusters) -> None:
    if len(clusters) != control.num_layers or clusters.num_experts != control.num_experts:
        raise ValueError(
            f"clusters cover {len(clusters)} layers x {clusters.num_experts} experts, the student has "
            f"{control.num_layers} MoE layers x {control.num_experts} experts"
        )


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _load_cv(control: RoutingControl) -> float:
    """Largest coefficient of variation of the expert loads over layers (last forward)."""
    worst = 0.0
    for experts_TK in control.selected_experts:
        if experts_TK is None:
            continue
        load_E = torch.bincount(experts_TK.reshape(-1).long(), minlength=control.num_experts).float()
        mean = load_E.mean()
        worst = max(worst, float(load_E.std(unbiased=False) / mean) if mean > 0 else math.inf)
    return worst
