"""PADD's RL and distillation math as small free functions (no model, plain tensors).

Each function is checked against hand-computed values in tests/test_objectives.py; the trainer
only composes them. Signs follow docs/method.md's corrected forms.

Legend: P = prompts, G = generations per prompt, B = P·G rows, R = response tokens,
L = MoE layers, E = experts, T = tokens (any leading shape).
"""

from __future__ import annotations

import torch

__all__ = [
    "SCALE_REWARDS",
    "TEMPERATURE_FORMS",
    "DRIFT_ON",
    "advantage_temperature",
    "clip_fraction",
    "clipped_surrogate",
    "drift_penalised_ratio",
    "expert_load_and_advantage",
    "group_advantages",
    "groups_with_signal",
    "informative_groups",
    "masked_mean",
    "phi",
    "reference_kl",
    "router_drift",
    "update_selection_bias",
]

SCALE_REWARDS = ("group", "batch", "none")
TEMPERATURE_FORMS = ("corrected", "paper")
DRIFT_ON = ("negative", "all", "none")
# Which rollouts Stage II distils on: every one (the method as printed), or those of the prompts
# the teacher answers right itself, greedily (the tuned default: the verifier says where a teacher
# is worth distilling).
KD_ON = ("all", "teacher_correct")


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `x` over entries where `mask` is nonzero (0 when the mask is empty, never NaN)."""
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def groups_with_signal(rewards_PG: torch.Tensor) -> torch.Tensor:
    """bool [P]: the groups whose G rewards are not all equal (the others have advantage 0)."""
    return rewards_PG.amax(1) != rewards_PG.amin(1)


def informative_groups(rewards_PG: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of `keep` of the P groups: those whose G rewards differ first, in
    order, then the others, in order.

    A group whose rewards are all equal has advantage 0 everywhere, so it gives the policy
    gradient nothing (DAPO's dynamic sampling drops it and samples more). Drawing rollouts for
    more prompts than one update takes and keeping these spends the update on prompts the policy
    sometimes gets right and sometimes wrong.
    """
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards_PG.shape)}")
    if not 1 <= keep <= rewards_PG.shape[0]:
        raise ValueError(f"keep must be in [1, {rewards_PG.shape[0]}], got {keep}")
    differ = groups_with_signal(rewards_PG)
    order = torch.cat([differ.nonzero().flatten(), (~differ).nonzero().flatten()])
    return order[:keep].sort().values


def group_advantages(
    rewards_PG: torch.Tensor, eps: float = 1e-4, scale_rewards: bool | str = True
) -> torch.Tensor:
    """Group-relative advantage `A_i = (r_i − mean_g r) / (std_g r + eps)`, shape [P, G].

    `scale_rewards`: True / "group" divides by the group's std (unbiased, as TRL), "batch" by the
    std of all rewards, False / "none" only centres. Groups whose rewards are all equal get
    exactly 0 (not round-off divided by eps), and G = 1 gives 0, never NaN.
    """
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards_PG.shape)}")
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if mode not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be a bool or one of {SCALE_REWARDS}, got {scale_rewards!r}")
    r = rewards_PG.double()
    G = r.shape[1]
    if G < 2:
        return torch.zeros_like(rewards_PG, dtype=torch.float32)
    centred = r - r.mean(1, keepdim=True)
    constant = (r.max(1, keepdim=True).values - r.min(1, keepdim=True).values) == 0
    if mode == "group":
        adv = centred / (r.std(1, keepdim=True) + eps)
    elif mode == "batch":
        adv = centred / (r.std() + eps)
    else:
        adv = centred
    return adv.masked_fill(constant, 0.0).float()


def phi(adv: torch.Tensor, rho: float = 0.5, kappa: float = 1.0, form: str = "corrected") -> torch.Tensor:
    """Advantage-dependent temperature factor Φ(A).

    "corrected": `1 − ρ·tanh(κA)` (good paths, A > 0, get a lower temperature: sharper teacher).
    "paper": the printed `1 + tanh(κA)` (the opposite direction; kept for the ablation).
    """
    if form == "corrected":
        return 1.0 - rho * torch.tanh(kappa * adv)
    if form == "paper":
        return 1.0 + torch.tanh(kappa * adv)
    raise ValueError(f"form must be one of {TEMPERATURE_FORMS}, got {form!r}")


def advantage_temperature(
    adv: torch.Tensor,
    tau: float = 1.0,
    rho: float = 0.5,
    kappa: float = 1.0,
    form: str = "corrected",
    min_temperature: float = 1e-2,
) -> torch.Tensor:
    """Per-sequence teacher temperature `T_eff = τ·Φ(A)`, clamped below at `min_temperature`
    (the printed form reaches 0 for very negative A, which would divide the logits by zero)."""
    return (tau * phi(adv, rho, kappa, form)).clamp_min(min_temperature)


def router_drift(new_probs: list[torch.Tensor], old_probs: list[torch.Tensor]) -> torch.Tensor:
    """Routing drift Γ: per token, the L2 distance between new and old router probability
    vectors, averaged over MoE layers.

    Args: L tensors [..., E] each (same shapes). Returns [...] (fp32). Γ ∈ [0, √2].
    """
    if len(new_probs) != len(old_probs) or not new_probs:
        raise ValueError(f"need the same nonzero number of layers, got {len(new_probs)} and {len(old_probs)}")
    per_layer = [
        torch.linalg.vector_norm(n.float() - o.float(), dim=-1)
        for n, o in zip(new_probs, old_probs, strict=True)
    ]
    return torch.stack(per_layer).mean(0)


def drift_penalised_ratio(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    drift: torch.Tensor | None,
    adv: torch.Tensor,
    lam: float = 1.0,
    drift_on: str = "negative",
) -> torch.Tensor:
    """PR-GRPO's importance ratio `ρ̂ = ρ · exp(−λ · sg(Γ) · 1[A < 0])`, shape [B, R].

    `ρ = exp(logp_new − logp_old)`; `adv` is per sequence [B] (broadcast over tokens) or [B, R].
    The penalty is detached: the drift scales the ratio but is never a path for gradients.
    `drift_on`: "negative" (PADD: poor paths only), "all" (RSPO-style: every sample), "none".
    """
    if drift_on not in DRIFT_ON:
        raise ValueError(f"drift_on must be one of {DRIFT_ON}, got {drift_on!r}")
    ratio = torch.exp(logp_new - logp_old)
    if drift is None or drift_on == "none" or lam == 0:
        return ratio
    if adv.dim() == ratio.dim() - 1:
        adv = adv.unsqueeze(-1)
    gate = (adv < 0).to(ratio.dtype) if drift_on == "negative" else torch.ones_like(adv, dtype=ratio.dtype)
    return ratio * torch.exp(-lam * drift.detach().to(ratio.dtype) * gate)


def clipped_surrogate(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    epsilon: float = 0.2,
    mask: torch.Tensor | None = None,
    epsilon_high: float | None = None,
) -> torch.Tensor:
    """GRPO's clipped objective J (to maximise): mean over response tokens of
    `min(ρ̂·A, clip(ρ̂, 1 − ε, 1 + ε_high)·A)`; `ε_high` defaults to ε.

    Shapes: ratio [B, R]; adv [B] or [B, R]; mask [B, R]. The mean is over all response tokens of
    the batch (token-level), so long responses are not down-weighted.
    """
    if adv.dim() == ratio.dim() - 1:
        adv = adv.unsqueeze(-1)
    high = epsilon if epsilon_high is None else epsilon_high
    per_token = torch.minimum(ratio * adv, ratio.clamp(1.0 - epsilon, 1.0 + high) * adv)
    return masked_mean(per_token, mask)


def clip_fraction(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    epsilon: float = 0.2,
    mask: torch.Tensor | None = None,
    epsilon_high: float | None = None,
) -> torch.Tensor:
    """Fraction of response tokens whose clipped term is the active one (gradient cut off)."""
    if adv.dim() == ratio.dim() - 1:
        adv = adv.unsqueeze(-1)
    high = epsilon if epsilon_high is None else epsilon_high
    clipped = ((ratio > 1.0 + high) & (adv > 0)) | ((ratio < 1.0 - epsilon) & (adv < 0))
    return masked_mean(clipped.float(), mask).detach()


def reference_kl(logp_new: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref): `exp(d) − d − 1`, d = logp_ref − logp_new (≥ 0)."""
    d = logp_ref - logp_new
    return torch.exp(d) - d - 1.0


def expert_load_and_advantage(
    selected_experts: list[torch.Tensor],
    token_adv: torch.Tensor,
    mask: torch.Tensor | None,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and expert: routed slot counts and the sum of the advantages of those tokens.

    Args:
        selected_experts: L tensors [T, k] (expert ids of each token's k slots).
        token_adv: [T] advantage of each token (its sequence's A_i).
        mask: [T] tokens to count (response tokens), or None for all.
    Returns: (counts [L, E], adv_sums [L, E]) in fp64, ready for an all-reduce; the per-expert
        mean advantage is `adv_sums / counts` where counts > 0.
    """
    counts, sums = [], []
    adv_T = token_adv.reshape(-1).double()
    keep = None if mask is None else mask.reshape(-1).bool()
    for sel_TK in selected_experts:
        sel_TK = sel_TK.long().to(adv_T.device)
        adv = adv_T
        if keep is not None:
            sel_TK, adv = sel_TK[keep], adv[keep]
        flat = sel_TK.reshape(-1)
        slot_adv = adv.unsqueeze(-1).expand_as(sel_TK).reshape(-1)
        counts.append(torch.bincount(flat, minlength=num_experts).double())
        sums.append(
            torch.zeros(num_experts, dtype=torch.float64, device=adv.device).index_add_(0, flat, slot_adv)
        )
    if not counts:
        empty = torch.zeros(0, num_experts, dtype=torch.float64)
        return empty, empty.clone()
    return torch.stack(counts), torch.stack(sums)


@torch.no_grad()
def update_selection_bias(
    bias: torch.Tensor,
    load_fraction: torch.Tensor,
    expert_adv_mean: torch.Tensor,
    ema_state: torch.Tensor,
    eta: float = 1e-3,
    gamma: float = 1e-3,
    lam_ema: float = 0.1,
    sign_form: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage IV, in place: `b_j ← b_j − η·(f_j − f̄) + γ·EMA(A_j)`, with f̄ = 1/E.

    Args (all [L, E]):
        bias: the selection bias (updated in place).
        load_fraction: f_j, fraction of routed slots on expert j (rows sum to 1).
        expert_adv_mean: A_j, mean advantage of the tokens routed to j this step; NaN where no
            token went to j (its EMA is then left unchanged).
        ema_state: EMA of A_j (updated in place): `EMA ← λ_ema·A_j + (1 − λ_ema)·EMA`.
        sign_form: use `η·sign(f_j − f̄)` for the load term (DeepSeek-V3 style).
    Returns: (bias, ema_state), the same tensors.

    The load term's sign is the corrected one: an overloaded expert (f_j > f̄) loses bias.
    """
    num_experts = bias.shape[-1]
    f = load_fraction.to(bias.device, torch.float32)
    a = expert_adv_mean.to(bias.device, torch.float32)
    seen = ~torch.isnan(a)
    ema_state.copy_(torch.where(seen, lam_ema * a.nan_to_num(0.0) + (1.0 - lam_ema) * ema_state, ema_state))
    excess = f - 1.0 / num_experts
    load_term = torch.sign(excess) if sign_form else excess
    bias.add_(-eta * load_term + gamma * ema_state)
    return bias, ema_state
