"""Teacher routing targets per sequence, for students with tied expert groups.

Shape legend: B sequences, S positions, H hidden size, T tokens, G = N/k groups, N experts,
k = top_k (the group size).

The teacher has no router, so the student's routes must be distilled from something the teacher
computes. For a tied-group student (`padd.decompress.tied_groups`) the choice of group changes
nothing at initialisation, so the target may be anything the teacher can tell apart; what makes
experts specialise is that a whole problem takes one path. Here the target of every token of a
sequence is the teacher's own clustering of that sequence:

- feature: the teacher's final hidden state (after its last norm), averaged over the prompt
  tokens and L2-normalised: what the teacher "reads" the problem as;
- G balanced k-means centroids of those features on D_A (`fit_sequence_targets`);
- `p_T(seq)_g = softmax_g(cos(feature, μ_g) / ξ)`; an expert of group g gets `p_T_g / k`.

No label is read: the clusters are unsupervised. The router (a linear map of each token's hidden
state) learns to predict its sequence's cluster, first in Stage I (`fit_group_router`, a
closed-form-like fit on D_A), then in Stages II–IV through `L_route = Σ_l KL(p_S,l ‖ p_T)` on the
student's own rollouts (the trainer's router objective).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .clustering import balanced_kmeans
from .convert import moe_blocks

__all__ = [
    "TARGETS_FILENAME",
    "SequenceRouterTargets",
    "fit_group_router",
    "fit_sequence_targets",
    "prompt_mean",
    "sft_prompt_mask",
]

TARGETS_FILENAME = "padd_router_targets.safetensors"
IGNORE = -100


def prompt_mean(hidden_BSH: torch.Tensor, prompt_mask_BS: torch.Tensor) -> torch.Tensor:
    """`[B, H]` fp32 mean of the hidden states over each row's prompt positions."""
    m = prompt_mask_BS.to(hidden_BSH.device, torch.float32).unsqueeze(-1)
    return (hidden_BSH.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def sft_prompt_mask(batch: Mapping) -> torch.Tensor:
    """The prompt positions of a `prompt + solution` batch: real tokens whose label is ignored."""
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
    labels = batch.get("labels")
    return mask.bool() if labels is None else mask.bool() & (labels == IGNORE)


@dataclass
class SequenceRouterTargets:
    """Teacher sequence clusters as routing targets.

    Attributes:
        centroids_GH: fp32 unit-norm centroids of the teacher's prompt features.
        group_size: k, experts per group (expert `g·k + j` belongs to group g).
        xi: target temperature ξ on the cosine similarity.
    """

    centroids_GH: torch.Tensor
    group_size: int
    xi: float

    @property
    def num_groups(self) -> int:
        return self.centroids_GH.shape[0]

    def group_probs(self, features_BH: torch.Tensor) -> torch.Tensor:
        """`[B, G]` `softmax(cos(feature, μ_g) / ξ)`."""
        f = nn.functional.normalize(features_BH.float(), dim=-1)
        return torch.softmax(f @ self.centroids_GH.to(f.device).T / self.xi, dim=-1)

    def expert_log_targets(self, features_BH: torch.Tensor) -> torch.Tensor:
        """`[B, N]` log-probabilities over experts: `log(p_g / k)` for each expert of group g."""
        log_p = torch.log(self.group_probs(features_BH).clamp_min(1e-30)) - torch.log(
            torch.tensor(float(self.group_size))
        )
        return log_p.repeat_interleave(self.group_size, dim=-1)

    def save(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TARGETS_FILENAME)
        meta = {"group_size": str(self.group_size), "xi": repr(self.xi)}
        save_file({"centroids": self.centroids_GH.detach().cpu().contiguous()}, path, meta)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SequenceRouterTargets | None:
        """The targets saved beside a checkpoint, or None when it has none."""
        path = os.path.join(directory, TARGETS_FILENAME)
        if not os.path.isfile(path):
            return None
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata()
        return cls(load_file(path)["centroids"], int(meta["group_size"]), float(meta["xi"]))

    def with_xi(self, xi: float) -> SequenceRouterTargets:
        return SequenceRouterTargets(self.centroids_GH, self.group_size, xi)


@torch.no_grad()
def teacher_prompt_features(teacher: nn.Module, batch: Mapping) -> torch.Tensor:
    """`[B, H]` the teacher's final hidden state averaged over the prompt of each SFT row."""
    device = next(teacher.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    hidden = teacher.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return prompt_mean(hidden, sft_prompt_mask(batch))


def fit_sequence_targets(
    teacher: nn.Module,
    batches: Iterable[Mapping],
    num_groups: int,
    group_size: int,
    *,
    xi: float = 0.05,
    seed: int = 0,
) -> SequenceRouterTargets:
    """Balanced k-means of the teacher's prompt features on `batches` (D_A) into `num_groups`."""
    if xi <= 0:
        raise ValueError(f"xi must be > 0, got {xi}")
    was_training = teacher.training
    teacher.eval()
    try:
        feats = torch.cat([teacher_prompt_features(teacher, b).cpu() for b in batches])
    finally:
        teacher.train(was_training)
    usable = feats.shape[0] - feats.shape[0] % num_groups
    if usable < num_groups:
        raise ValueError(f"{feats.shape[0]} sequences cannot form {num_groups} clusters")
    result = balanced_kmeans(feats[:usable], num_groups, seed=seed, normalize=True)
    centroids = nn.functional.normalize(result.centroids_ND.float(), dim=-1)
    return SequenceRouterTargets(centroids, group_size, xi)


class _RouterInputs:
    """Forward pre-hooks that keep each MoE router's input `[T, H]` of the last call."""

    def __init__(self, model: nn.Module):
        self.blocks = moe_blocks(model)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._handles = [b.gate.register_forward_pre_hook(self._hook(l)) for l, b in enumerate(self.blocks)]

    def _hook(self, layer: int):
        def hook(_module, args):
            self.inputs[layer] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def fit_group_router(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping],
    targets: SequenceRouterTargets,
    *,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
) -> list[float]:
    """Fit each layer's tied router rows to predict the teacher's sequence targets, in place.

    Every token of a sequence gets its sequence's `p_T`; each layer's `[G, H]` group rows are
    fitted by full-batch Adam on the cross-entropy, then repeated k times into `gate.weight`.
    Returns the per-layer agreement (argmax of the router == argmax of `p_T`) on the tokens.
    """
    device = next(student.parameters()).device
    hooks = _RouterInputs(student)
    xs: list[list[torch.Tensor]] = [[] for _ in hooks.blocks]
    ps: list[torch.Tensor] = []
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                student(input_ids=ids, attention_mask=mask, use_cache=False)
                keep_T = mask.reshape(-1).bool()
                p_BG = targets.group_probs(teacher_prompt_features(teacher, batch))
                ps.append(p_BG.repeat_interleave(ids.shape[1], dim=0)[keep_T.to(p_BG.device)].cpu())
                for l, x in enumerate(hooks.inputs):
                    xs[l].append(x[keep_T].cpu())
    finally:
        hooks.remove()
        student.train(was_training)
    p_TG = torch.cat(ps)
    agreement = []
    for l, block in enumerate(hooks.blocks):
        x_TH = torch.cat(xs[l])
        w_GH = _fit_softmax_regression(x_TH, p_TG, steps=steps, lr=lr, weight_decay=weight_decay)
        with torch.no_grad():
            block.gate.weight.copy_(w_GH.repeat_interleave(targets.group_size, dim=0).to(block.gate.weight))
            agreement.append(float(((x_TH @ w_GH.T).argmax(-1) == p_TG.argmax(-1)).float().mean()))
    return agreement


def _fit_softmax_regression(
    x_TH: torch.Tensor, p_TG: torch.Tensor, *, steps: int, lr: float, weight_decay: float
) -> torch.Tensor:
    """`argmin_W CE(softmax(x Wᵀ), p) + wd·‖W‖²` by full-batch Adam, from zero (deterministic)."""
    w = torch.zeros(p_TG.shape[1], x_TH.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        loss = -(p_TG * torch.log_softmax(x_TH @ w.T, -1)).sum(-1).mean() + weight_decay * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()
