"""The paper's setting: an existing pre-trained MoE student (Qwen3-MoE, Mixtral, OLMoE, ...),
whose hidden size may differ from the teacher's.

Shape legend: T tokens, H_S student hidden size, N student experts, F teacher `d_ff`.

Stage I here restores and specialises the student's own experts instead of building them:
1. Student MoE layer l takes teacher layer `floor(l · L_T / L_S)`; that layer's neurons are
   clustered into the student's N experts (balanced k-means, `F / N` each).
2. One pass over `D_A` runs both models on the same token ids and accumulates, per layer, the
   normal equations of the least-squares map from the student's router input `h_S(x)` to the
   teacher's cluster scores `s(x) = mean_{i∈C_j} a_i(x) / ξ`, and the co-occurrence
   `Σ_x p_S(x) p_T(x)ᵀ` of the student's current routing with the teacher's cluster targets.
3. Clusters are relabelled so that cluster e is the one the student's expert e already serves
   most (greedy maximum matching on the co-occurrence): the router keeps sending each expert
   the tokens it was trained on, now organised by the teacher's neurons.
4. Router weights: `W = argmin Σ_x ||W h_S(x) − s(x)||² + λ ||W||²` (ridge `λ = ridge ·
   mean(diag(HᵀH))`), solved from the `[H_S, H_S]` and `[H_S, N]` accumulators.

The experts' weights are not touched; the warmup (`warmup`) then trains them with the teacher's
cluster targets. Token ids must mean the same in both models (same tokenizer; a teacher with a
larger, padded vocabulary is fine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from padd.moe.routing_control import check_routers

from .convert import moe_blocks
from .neurons import TeacherClusters, cluster_teacher, teacher_mlps
from .stats import ClusterScoreHooks, unpack_batch

__all__ = ["PretrainedInit", "init_pretrained_student", "match_clusters_to_experts"]


@dataclass
class PretrainedInit:
    """The outcome of `init_pretrained_student`.

    Attributes:
        clusters: per student MoE layer, the teacher clustering relabelled to the student's
            experts (pass it to `warmup`).
        r2: per layer, coefficient of determination of the least-squares router fit on `D_A`.
        mse_before, mse_after: per layer, mean squared error of the router logits vs the teacher
            cluster scores, with the original router and with the fitted one.
        num_tokens: tokens of `D_A` used (padding excluded).
    """

    clusters: TeacherClusters
    r2: list[float]
    mse_before: list[float]
    mse_after: list[float]
    num_tokens: int


def match_clusters_to_experts(cooc_NN: torch.Tensor) -> torch.Tensor:
    """Greedy maximum matching: `perm[e]` is the cluster given to expert e.

    Repeatedly takes the largest remaining `cooc[e, j]` (expert e, cluster j) and removes its
    row and column; ties go to the lower flat index.
    """
    n = cooc_NN.shape[0]
    score = cooc_NN.double().clone()
    perm = torch.full((n,), -1, dtype=torch.long)
    for _ in range(n):
        flat = int(torch.argmax(score))
        e, j = divmod(flat, n)
        perm[e] = j
        score[e, :] = -torch.inf
        score[:, j] = -torch.inf
    return perm


@torch.no_grad()
def init_pretrained_student(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping | torch.Tensor],
    *,
    xi: float = 1.0,
    method: str = "kmeans",
    seed: int = 0,
    ridge: float = 1e-3,
    match_experts: bool = True,
    max_batches: int | None = None,
) -> PretrainedInit:
    """Fit a pre-trained MoE student's routers to the teacher's neuron clusters (in place).

    Args:
        student: a transformers MoE causal LM (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, ...). Its
            router weights (`block.gate.weight`) are overwritten; nothing else changes.
        teacher: a dense gated-MLP causal LM on the same tokenizer.
        batches: `D_A` batches (token-id tensors or dicts with `input_ids`/`attention_mask`).
        xi: temperature of the cluster scores the router is fitted to.
        method: teacher clustering, "kmeans" or "random".
        ridge: relative ridge strength of the least-squares fit.
        match_experts: relabel clusters to the experts that already serve them (else identity).
        max_batches: stop after this many batches.

    Returns:
        `PretrainedInit` with the relabelled clusters and fit diagnostics.
    """
    blocks = moe_blocks(student)
    if not blocks:
        raise ValueError(f"{type(student).__name__} has no transformers MoE block (`gate` + fused `experts`)")
    check_routers(student)  # Stages II-IV steer its routers: refuse a family they would change, now
    num_experts = blocks[0].gate.weight.shape[0]
    d_ff = teacher_mlps(teacher)[0].gate_proj.weight.shape[0]
    if d_ff % num_experts:
        raise ValueError(f"teacher d_ff={d_ff} is not divisible by the student's {num_experts} experts")
    clusters = cluster_teacher(teacher, num_experts, method=method, seed=seed, num_student_layers=len(blocks))
    acc = _FitAccumulator(blocks, num_experts)
    device = blocks[0].gate.weight.device
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        with ClusterScoreHooks(teacher, clusters, xi=xi) as targets, acc.hooked():
            for b, batch in enumerate(batches):
                if max_batches is not None and b >= max_batches:
                    break
                input_ids, mask = unpack_batch(batch)
                t_mask = mask.to(teacher.device) if mask is not None else None
                teacher(input_ids=input_ids.to(teacher.device), attention_mask=t_mask, use_cache=False)
                s_mask = mask.to(device) if mask is not None else None
                student(input_ids=input_ids.to(device), attention_mask=s_mask, use_cache=False)
                keep_T = None if mask is None else mask.reshape(-1).to(device) > 0
                acc.add([s.to(device) for s in targets.scores], keep_T)
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    if acc.tokens == 0:
        raise ValueError("init_pretrained_student saw no tokens: `batches` is empty or fully masked")
    r2, before, after = [], [], []
    for l, block in enumerate(blocks):
        perm = match_clusters_to_experts(acc.cooc[l]) if match_experts else torch.arange(num_experts)
        clusters.layers[l] = clusters.layers[l].permute(perm)
        weight_NH, fit = acc.solve(l, perm.to(device), ridge)
        before.append(acc.mse(l, block.gate.weight.float().T, perm.to(device)))
        block.gate.weight.copy_(weight_NH.to(block.gate.weight))
        r2.append(fit)
        after.append(acc.mse(l, weight_NH.T, perm.to(device)))
    return PretrainedInit(clusters, r2, before, after, acc.tokens)


class _FitAccumulator:
    """Per-layer sums for the ridge fit (HᵀH, HᵀY, Σ Y, Σ Y²) and the routing co-occurrence."""

    def __init__(self, blocks: list[nn.Module], num_experts: int) -> None:
        self.blocks = blocks
        hidden = blocks[0].gate.weight.shape[1]
        device = blocks[0].gate.weight.device
        num_layers = len(blocks)
        zeros = lambda *shape: [
            torch.zeros(*shape, device=device, dtype=torch.float64) for _ in range(num_layers)
        ]
        self.hth, self.hty = zeros(hidden, hidden), zeros(hidden, num_experts)
        self.y_sum, self.y_sq = zeros(num_experts), zeros(num_experts)
        self.cooc = zeros(num_experts, num_experts)
        self.tokens = 0
        self._inputs: list[torch.Tensor | None] = [None] * num_layers
        self._logits: list[torch.Tensor | None] = [None] * num_layers

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Forward hooks on every router, recording its input and logits."""
        handles = [b.gate.register_forward_hook(self._make_hook(l)) for l, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _make_hook(self, layer: int):
        def hook(router, args, output):
            self._inputs[layer] = args[0].reshape(-1, args[0].shape[-1]).double()
            self._logits[layer] = output[0].reshape(-1, output[0].shape[-1]).float()

        return hook

    def add(self, scores: list[torch.Tensor], keep_T: torch.Tensor | None) -> None:
        for l, y_TN in enumerate(scores):
            h_TH, z_TN, y_TN = self._inputs[l], self._logits[l], y_TN.double()
            if keep_T is not None:
                h_TH, z_TN, y_TN = h_TH[keep_T], z_TN[keep_T], y_TN[keep_T]
            self.hth[l] += h_TH.T @ h_TH
            self.hty[l] += h_TH.T @ y_TN
            self.y_sum[l] += y_TN.sum(0)
            self.y_sq[l] += y_TN.square().sum(0)
            self.cooc[l] += torch.softmax(z_TN, -1).double().T @ torch.softmax(y_TN, -1)
        self.tokens += int(keep_T.sum()) if keep_T is not None else self._inputs[0].shape[0]

    def solve(self, l: int, perm: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
        """Ridge solution `[N, H]` for the permuted targets, and its R² on the data."""
        hth = self.hth[l]
        lam = ridge * float(hth.diagonal().mean().clamp_min(1e-12))
        eye = torch.eye(hth.shape[0], dtype=hth.dtype, device=hth.device)
        w_HN = torch.linalg.solve(hth + lam * eye, self.hty[l][:, perm])
        sse = self._sse(l, w_HN, perm)
        sst = float((self.y_sq[l] - self.y_sum[l].square() / self.tokens).sum())
        return w_HN.T.float(), 1.0 - sse / max(sst, 1e-30)

    def mse(self, l: int, w_HN: torch.Tensor, perm: torch.Tensor) -> float:
        return self._sse(l, w_HN.double(), perm) / (self.tokens * w_HN.shape[1])

    def _sse(self, l: int, w_HN: torch.Tensor, perm: torch.Tensor) -> float:
        # Σ ||Wh − y||² = Σ y² − 2 tr(Wᵀ Hᵀy) + tr(Wᵀ HᵀH W), from the accumulators alone.
        hty = self.hty[l][:, perm]
        return float(self.y_sq[l].sum() - 2 * (w_HN * hty).sum() + (w_HN * (self.hth[l] @ w_HN)).sum())
