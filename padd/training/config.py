"""`PADDConfig`: every knob of the training loop, validated on construction, and the baselines
as named presets of the same loop.

GRPO fields keep TRL's names where they mean the same (`num_generations`, `epsilon`, `beta`,
`scale_rewards`, `num_iterations`, `learning_rate`, `max_grad_norm`, `temperature`, `top_p`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .objectives import DRIFT_ON, KD_ON, SCALE_REWARDS, TEMPERATURE_FORMS

__all__ = ["PADDConfig", "PRESETS", "preset"]

KD_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
KD_TEMPERATURE_MODES = ("adaptive", "fixed")
# Switches that were merged into another field: a config naming one is refused with its replacement.
REPLACED = {
    "use_drift": "replaced by drift_on: 'none' switches Stage III off ('negative' is PADD, 'all' RSPO-style)",
}


def _meta(help: str) -> dict:
    return {"help": help}


@dataclass
class PADDConfig:
    """Stages II–IV of PADD and their switches (see docs/method.md for the formulas)."""

    seed: int = field(default=0, metadata=_meta("seeds torch, python random and numpy at trainer start"))

    # Rollouts
    num_generations: int = field(default=8, metadata=_meta("G, samples per prompt"))
    max_new_tokens: int = field(default=128, metadata=_meta("response length cap"))
    temperature: float = field(
        default=1.0, metadata=_meta("sampling temperature (also divides policy logits)")
    )
    top_p: float = field(default=1.0, metadata=_meta("nucleus sampling mass"))

    # Rewards
    w_answer: float = field(default=1.0, metadata=_meta("weight of the exact-match answer reward"))
    w_format: float = field(default=0.1, metadata=_meta("weight of the `#### N` format reward"))

    # GRPO
    learning_rate: float = field(default=1e-5, metadata=_meta("AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=_meta("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_meta("gradient clipping; 0 disables"))
    num_iterations: int = field(
        default=2,
        metadata=_meta(
            "updates per rollout batch (TRL's μ). ≥2 is what gives Stage III something to act on: "
            "at the first update θ = θ_old, so ratio = 1 and drift = 0"
        ),
    )
    epsilon: float = field(default=0.2, metadata=_meta("clip range ε"))
    epsilon_high: float | None = field(default=None, metadata=_meta("upper clip range (None: ε)"))
    beta: float = field(default=0.0, metadata=_meta("reference-KL weight (k3); 0 keeps no reference model"))
    scale_rewards: bool | str = field(default=True, metadata=_meta("True/'group', 'batch', False/'none'"))
    adv_eps: float = field(default=1e-4, metadata=_meta("ε in A = (r − mean)/(std + ε)"))
    dynamic_sampling: int = field(
        default=1,
        metadata=_meta(
            "prompts sampled per prompt updated on: `step` draws rollouts for all the prompts it is "
            "given and updates on 1/dynamic_sampling of them, the groups whose rewards differ first "
            "(DAPO's dynamic sampling; the pipeline gives it prompts_per_step × this). 1 = off"
        ),
    )

    # Stage II: online adaptive distillation
    use_kd: bool = field(default=True, metadata=_meta("Stage II on/off"))
    alpha_kd: float = field(default=1.0, metadata=_meta("α_KD in −J + α_KD·L_KD"))
    kd_divergence: str = field(default="forward_kl", metadata=_meta(f"one of {KD_DIVERGENCES}"))
    kd_jsd_beta: float = field(default=0.5, metadata=_meta("JSD mixture weight (kd_divergence='jsd')"))
    kd_temperature_mode: str = field(default="adaptive", metadata=_meta("'adaptive' τ·Φ(A) or 'fixed' τ"))
    tau: float = field(default=1.0, metadata=_meta("base teacher temperature τ"))
    rho: float = field(default=0.5, metadata=_meta("ρ in Φ = 1 − ρ·tanh(κA)"))
    kappa: float = field(default=1.0, metadata=_meta("κ in Φ"))
    temperature_form: str = field(default="corrected", metadata=_meta("'corrected' or the 'paper' literal Φ"))
    kd_on: str = field(
        default="all",
        metadata=_meta(
            "rollouts L_KD averages over: 'all' (the method), 'negative' (only A < 0: the teacher "
            "corrects poor paths), 'non_negative' (A ≥ 0: the poor paths are left to the reward) or "
            "'teacher_correct' (prompts whose greedy teacher answer earns the answer reward: a teacher "
            "weaker than its student is distilled only where the verifier says it is right) or "
            "'teacher_correct_negative' (the poor paths, A < 0, of those prompts) or "
            "'teacher_correct_non_negative' (the others, A ≥ 0, of those prompts)"
        ),
    )
    kd_fused: bool | str = field(
        default="auto", metadata=_meta("fused-linear KD kernel: 'auto' (CUDA and available), True, False")
    )

    # Routing of a tied-group student (`decompress(init="exact")`), with `router_targets`
    router_weight: float = field(
        default=0.0,
        metadata=_meta(
            "weight of L_route = Σ_l KL(p_S,l ‖ p_T) towards the teacher's sequence clusters; 0 = off"
        ),
    )

    # Stage III: PR-GRPO
    drift_lambda: float = field(default=1.0, metadata=_meta("λ in exp(−λ·sg(Γ)·1[A<0])"))
    drift_on: str = field(
        default="negative",
        metadata=_meta("samples the drift penalty gates: 'negative' (PADD), 'all' (RSPO), 'none' (off)"),
    )

    # Stage IV: reward-augmented load balancing
    use_bias: bool = field(default=True, metadata=_meta("Stage IV selection-bias updates on/off"))
    bias_eta: float = field(default=1e-3, metadata=_meta("η, load term"))
    bias_gamma: float = field(default=1e-3, metadata=_meta("γ, advantage term"))
    bias_lam_ema: float = field(default=0.1, metadata=_meta("λ_ema of the per-expert advantage EMA"))
    bias_sign_form: bool = field(default=False, metadata=_meta("η·sign(f − f̄) instead of η·(f − f̄)"))

    # Not a setting: a YAML or caller still passing the merged switch gets an error that names its
    # replacement (`training.params.use_drift` reaches this check through the run config's types).
    use_drift: Any = field(default=None, repr=False, compare=False, metadata=_meta(REPLACED["use_drift"]))

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"PADDConfig.{key}={getattr(self, key)!r}: {why}")

        for key, why in REPLACED.items():
            if getattr(self, key) is not None:
                raise bad(key, why)

        for key in ("num_generations", "max_new_tokens", "num_iterations", "dynamic_sampling"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, "must be an integer ≥ 1")
        positive = ("temperature", "learning_rate", "tau", "adv_eps")
        for key in positive:
            if not _finite(getattr(self, key)) or getattr(self, key) <= 0:
                raise bad(key, "must be a finite number > 0")
        non_negative = (
            "w_answer", "w_format", "weight_decay", "max_grad_norm", "epsilon", "beta", "alpha_kd",
            "rho", "kappa", "drift_lambda", "bias_eta", "bias_gamma", "router_weight",
        )  # fmt: skip
        for key in non_negative:
            if not _finite(getattr(self, key)) or getattr(self, key) < 0:
                raise bad(key, "must be a finite number ≥ 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.kd_jsd_beta <= 1:
            raise bad("kd_jsd_beta", "must be in [0, 1]")
        if not 0 < self.bias_lam_ema <= 1:
            raise bad("bias_lam_ema", "must be in (0, 1]")
        if self.epsilon >= 1:
            raise bad("epsilon", "must be < 1 (the ratio is clipped to [1 − ε, 1 + ε])")
        if self.epsilon_high is not None and (not _finite(self.epsilon_high) or self.epsilon_high < 0):
            raise bad("epsilon_high", "must be None or a finite number ≥ 0")
        if self.scale_rewards not in (True, False, *SCALE_REWARDS):
            raise bad("scale_rewards", f"must be a bool or one of {SCALE_REWARDS}")
        if self.kd_divergence not in KD_DIVERGENCES:
            raise bad("kd_divergence", f"must be one of {KD_DIVERGENCES}")
        if self.kd_temperature_mode not in KD_TEMPERATURE_MODES:
            raise bad("kd_temperature_mode", f"must be one of {KD_TEMPERATURE_MODES}")
        if self.temperature_form not in TEMPERATURE_FORMS:
            raise bad("temperature_form", f"must be one of {TEMPERATURE_FORMS}")
        if self.kd_on not in KD_ON:
            raise bad("kd_on", f"must be one of {KD_ON}")
        if self.drift_on not in DRIFT_ON:
            raise bad("drift_on", f"must be one of {DRIFT_ON}")
        if self.kd_fused not in (True, False, "auto"):
            raise bad("kd_fused", "must be True, False or 'auto'")
        if self.temperature_form == "corrected" and self.rho >= 1:
            raise bad("rho", "must be < 1 with the corrected Φ = 1 − ρ·tanh(κA) (Φ must stay > 0)")
        for key in ("use_kd", "use_bias", "bias_sign_form"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be a bool")

    def to_dict(self) -> dict:
        """Every setting (the replaced switches are not settings)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in REPLACED}

    @classmethod
    def from_dict(cls, values: dict) -> PADDConfig:
        """Build from a mapping (YAML), naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PADDConfig key(s): {unknown}")
        return cls(**values)

    def replace(self, **changes) -> PADDConfig:
        return dataclasses.replace(self, **changes)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# The paper's comparison table, each a switch of the same loop. "No Stage I" is not a training
# switch: the pipeline builds the student with `padd.decompress(init="upcycle"|"random_split")`
# and trains it with the `padd` preset.
PRESETS: dict[str, dict] = {
    "padd": {},
    # The baselines have no teacher-guided routing: `router_weight` 0 wins over a run's setting.
    "vanilla_grpo": {"use_kd": False, "drift_on": "none", "use_bias": False, "router_weight": 0.0},
    "online_kd": {
        "use_kd": True,
        "kd_on": "all",
        "kd_temperature_mode": "fixed",
        "drift_on": "none",
        "use_bias": False,
        "router_weight": 0.0,
    },  # fmt: skip
    "rspo": {"use_kd": False, "drift_on": "all", "use_bias": False, "router_weight": 0.0},
    # The dense teacher trained by the same loop (the pipeline trains the teacher, not a student).
    "teacher_grpo": {"use_kd": False, "drift_on": "none", "use_bias": False, "router_weight": 0.0},
    "no_stage2": {"use_kd": False},
    "no_stage3": {"drift_on": "none"},
    "no_stage4": {"use_bias": False},
}


def preset(name: str, **overrides) -> PADDConfig:
    """The config of a named method (`PRESETS`), with `overrides` applied on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PADDConfig(**{**PRESETS[name], **overrides})
