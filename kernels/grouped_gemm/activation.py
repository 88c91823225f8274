"""The activations of the expert FFN, forward and hand-derived backward, in plain torch.

Shape legend: S slots (rows), I expert width. A *gated* activation takes the gate and up halves
of the gate/up GEMM, `[S, I]` each, in fp32, and returns `h [S, I]` (forward) or `(d gate, d up)`
(backward); a *non-gated* one takes the up GEMM's output `[S, I]` alone (the experts' first
weight is then the up projection `[E, I, H]`, half as wide). Each backward reproduces autograd
of its forward formula exactly, clamp masks included (`torch.clamp` passes the gradient where
`min <= x <= max`, bounds inclusive).

The gated activations are the ones transformers' MoE families compute (`limit` L, `alpha` α,
soft caps `gate_softcap` c_g and `up_softcap` c_u):

- `"swiglu"`: `silu(g) · u` (Mixtral, Qwen-MoE, DeepSeek-V3, ...).
- `"swiglu_limit"`: `silu(min(g, L)) · clamp(u, -L, L)`, the clamp before the SiLU
  (DeepSeek-V4, GLM-5-Next, HY-V4).
- `"swiglu_limit_post"`: `min(silu(g), L) · clamp(u, -L, L)`, the clamp after the SiLU
  (Step3p7, Bailing-Hybrid).
- `"gpt_oss"`: `(clamp(u, -L, L) + 1) · g' · σ(α·g')` with `g' = min(g, L)` (GPT-OSS, MiniMax-M3).
- `"swiglu_softcap"`: `c_g·tanh(g/c_g) · σ(g) · c_u·tanh(u/c_u)`: the sigmoid sees the raw gate,
  the soft caps bound the linear gate factor and the up half (Inkling2's
  `Inkling2SoftcappedSwiGLU`, `c_g = mlp_gate_softcap`, `c_u = mlp_up_softcap`). Both caps are
  required, finite and > 0 (transformers has no "off" value: it divides by them); it takes no
  limit or alpha, and the other activations take no soft caps.

A limit of None means no clamp (`"swiglu_limit"` and `"swiglu_limit_post"` are then `"swiglu"`).

The non-gated ones (no limit, no α), as transformers' `ACT2FN` computes them on the up projection
`u` of experts with `has_gate=False`:

- `"relu2"`: `relu(u)²` (Nemotron-H, Ergo).
- `"relu"`: `relu(u)`.
- `"silu"`: `silu(u)`.
- `"gelu"`: `gelu(u)`, the exact (erf) form (`ACT2FN["gelu"]`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "UNGATED_ACTIVATIONS",
    "GatedActivation",
    "activation_backward",
    "activation_forward",
    "check_activation",
    "softcap_backward",
    "softcap_forward",
    "ungated_backward",
    "ungated_forward",
]

GATED_ACTIVATIONS = ("swiglu", "swiglu_limit", "swiglu_limit_post", "gpt_oss", "swiglu_softcap")
UNGATED_ACTIVATIONS = ("relu2", "relu", "silu", "gelu")
ACTIVATIONS = GATED_ACTIVATIONS + UNGATED_ACTIVATIONS

# No clamp: a bound no finite fp32 value passes.
_NO_LIMIT = float("inf")


def check_activation(
    activation: str,
    limit: float | None,
    alpha: float | None,
    gate_softcap: float | None = None,
    up_softcap: float | None = None,
) -> None:
    """Raise `ValueError` for an unknown activation or a parameter it does not take."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "swiglu_softcap":
        for name, cap in (("gate_softcap", gate_softcap), ("up_softcap", up_softcap)):
            if not (isinstance(cap, int | float) and not isinstance(cap, bool) and 0 < cap < math.inf):
                raise ValueError(f"activation='swiglu_softcap' needs a finite positive {name}, got {cap!r}")
        if limit is not None or alpha is not None:
            raise ValueError("activation='swiglu_softcap' takes no limit or alpha (its caps are soft)")
        return
    if gate_softcap is not None or up_softcap is not None:
        raise ValueError(
            f"gate_softcap and up_softcap are parameters of activation='swiglu_softcap' only, "
            f"got activation={activation!r}"
        )
    if limit is not None and not (isinstance(limit, int | float) and limit > 0):
        raise ValueError(f"limit must be a positive number or None, got {limit!r}")
    if activation in UNGATED_ACTIVATIONS:
        if limit is not None or alpha is not None:
            raise ValueError(f"activation={activation!r} (no gate) takes no limit or alpha")
        return
    if activation == "swiglu" and limit is not None:
        raise ValueError("activation='swiglu' takes no limit; use 'swiglu_limit' or 'swiglu_limit_post'")
    if activation == "gpt_oss":
        if alpha is None or not isinstance(alpha, int | float):
            raise ValueError(f"activation='gpt_oss' needs a numeric alpha, got {alpha!r}")
    elif alpha is not None:
        raise ValueError(f"alpha is a parameter of activation='gpt_oss' only, got alpha={alpha!r}")


def _bound(limit: float | None) -> float:
    return _NO_LIMIT if limit is None else float(limit)


def ungated_forward(up_SI: torch.Tensor, activation: str) -> torch.Tensor:
    """`h [S, I]` of a non-gated `activation` (module docstring) from the up pre-activations."""
    if activation == "relu2":
        return torch.square(F.relu(up_SI))
    if activation == "relu":
        return F.relu(up_SI)
    if activation == "silu":
        return F.silu(up_SI)
    return F.gelu(up_SI)


def ungated_backward(dh_SI: torch.Tensor, up_SI: torch.Tensor, activation: str) -> torch.Tensor:
    """`d up [S, I]` of `ungated_forward` for the output gradient `dh` (0 at `u = 0` for the ReLUs,
    as autograd gives)."""
    if activation == "relu2":
        return dh_SI * 2 * F.relu(up_SI)
    if activation == "relu":
        return dh_SI * (up_SI > 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(dh_SI, up_SI)
    return torch.ops.aten.gelu_backward(dh_SI, up_SI)


def _softcap(x_SI: torch.Tensor, cap: float) -> torch.Tensor:
    """`cap · tanh(x / cap)`, in the order transformers' `Inkling2Softcap` computes it."""
    return torch.tanh(x_SI / cap) * cap


def softcap_forward(
    gate_SI: torch.Tensor, up_SI: torch.Tensor, gate_softcap: float, up_softcap: float
) -> torch.Tensor:
    """`h [S, I]` of `"swiglu_softcap"`: `c_g·tanh(g/c_g) · σ(g) · c_u·tanh(u/c_u)`."""
    return _softcap(gate_SI, gate_softcap) * torch.sigmoid(gate_SI) * _softcap(up_SI, up_softcap)


def softcap_backward(
    dh_SI: torch.Tensor, gate_SI: torch.Tensor, up_SI: torch.Tensor, gate_softcap: float, up_softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(d gate, d up)` of `softcap_forward`: with `t_g = tanh(g/c_g)`, `t_u = tanh(u/c_u)`,
    `d gate = dh · c_u·t_u · ((1 - t_g²)·σ(g) + c_g·t_g·σ(g)(1 - σ(g)))` and
    `d up = dh · c_g·t_g·σ(g) · (1 - t_u²)`."""
    t_g = torch.tanh(gate_SI / gate_softcap)
    t_u = torch.tanh(up_SI / up_softcap)
    sig = torch.sigmoid(gate_SI)
    capped_gate = t_g * gate_softcap
    d_gate = dh_SI * (t_u * up_softcap) * ((1 - t_g * t_g) * sig + capped_gate * sig * (1 - sig))
    return d_gate, dh_SI * (capped_gate * sig) * (1 - t_u * t_u)


def activation_forward(
    gate_SI: torch.Tensor,
    up_SI: torch.Tensor,
    activation: str,
    limit: float | None,
    alpha: float | None,
    gate_softcap: float | None = None,
    up_softcap: float | None = None,
) -> torch.Tensor:
    """`h [S, I]` of `activation` (module docstring) from the gate and up pre-activations."""
    if activation == "swiglu":
        return F.silu(gate_SI) * up_SI
    if activation == "swiglu_softcap":
        return softcap_forward(gate_SI, up_SI, gate_softcap, up_softcap)
    bound = _bound(limit)
    up_c = up_SI.clamp(-bound, bound)
    if activation == "swiglu_limit":
        return F.silu(gate_SI.clamp(max=bound)) * up_c
    if activation == "swiglu_limit_post":
        return F.silu(gate_SI).clamp(max=bound) * up_c
    gate_c = gate_SI.clamp(max=bound)
    return (up_c + 1) * (gate_c * torch.sigmoid(gate_c * alpha))


def activation_backward(
    dh_SI: torch.Tensor,
    gate_SI: torch.Tensor,
    up_SI: torch.Tensor,
    activation: str,
    limit: float | None,
    alpha: float | None,
    gate_softcap: float | None = None,
    up_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(d gate, d up)` `[S, I]` of `activation_forward` for the output gradient `dh`."""
    if activation == "swiglu":
        d_gate = torch.ops.aten.silu_backward(dh_SI * up_SI, gate_SI)
        return d_gate, dh_SI * F.silu(gate_SI)
    if activation == "swiglu_softcap":
        return softcap_backward(dh_SI, gate_SI, up_SI, gate_softcap, up_softcap)
    bound = _bound(limit)
    up_c = up_SI.clamp(-bound, bound)
    up_passes = (up_SI >= -bound) & (up_SI <= bound)
    if activation == "swiglu_limit":
        gate_c = gate_SI.clamp(max=bound)
        d_gate = torch.ops.aten.silu_backward(dh_SI * up_c, gate_c) * (gate_SI <= bound)
        return d_gate, dh_SI * F.silu(gate_c) * up_passes
    if activation == "swiglu_limit_post":
        silu_g = F.silu(gate_SI)
        d_gate = torch.ops.aten.silu_backward(dh_SI * up_c, gate_SI) * (silu_g <= bound)
        return d_gate, dh_SI * silu_g.clamp(max=bound) * up_passes
    gate_c = gate_SI.clamp(max=bound)
    sig = torch.sigmoid(gate_c * alpha)
    glu = gate_c * sig
    d_glu_d_gate = sig + alpha * glu * (1 - sig)
    d_gate = dh_SI * (up_c + 1) * d_glu_d_gate * (gate_SI <= bound)
    return d_gate, dh_SI * glu * up_passes


@dataclass(frozen=True)
class GatedActivation:
    """How the expert FFN turns its first GEMM's output into `h [S, I]`: the gate/up output
    `[S, 2I]` for a gated activation, the up output `[S, I]` for a non-gated one (`gated`).

    Attributes:
        name: one of `ACTIVATIONS` (module docstring).
        limit: the clamp bound L, or None for no clamp.
        alpha: α of `"gpt_oss"` (None for the others).
        interleaved: gate and up columns alternate (`[g0, u0, g1, u1, ...]`, GPT-OSS's layout)
            instead of the gate half then the up half (gated activations only).
        gate_softcap, up_softcap: c_g and c_u of `"swiglu_softcap"` (None for the others).
    """

    name: str = "swiglu"
    limit: float | None = None
    alpha: float | None = None
    interleaved: bool = False
    gate_softcap: float | None = None
    up_softcap: float | None = None

    def __post_init__(self) -> None:
        check_activation(self.name, self.limit, self.alpha, self.gate_softcap, self.up_softcap)
        if self.interleaved and not self.gated:
            raise ValueError(f"activation={self.name!r} has no gate: gate_up_interleaved must be False")

    @property
    def gated(self) -> bool:
        """The first weight holds gate and up rows (`[E, 2I, H]`); else up rows only (`[E, I, H]`)."""
        return self.name in GATED_ACTIVATIONS

    def width(self, inter: int) -> int:
        """Columns of the first GEMM's output for expert width I: 2I gated, I otherwise."""
        return 2 * inter if self.gated else inter

    @property
    def is_plain_swiglu(self) -> bool:
        """`silu(gate) · up` over the concatenated halves: what the Triton kernels compute."""
        return self.name == "swiglu" and not self.interleaved

    def split(self, gate_up_S2I: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up views `[S, I]` of a gate/up GEMM output (no copy)."""
        if self.interleaved:
            return gate_up_S2I[:, 0::2], gate_up_S2I[:, 1::2]
        inter = gate_up_S2I.shape[1] // 2
        return gate_up_S2I[:, :inter], gate_up_S2I[:, inter:]

    def forward(self, gate_up_S2I: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return ungated_forward(gate_up_S2I, self.name)
        return activation_forward(*self.split(gate_up_S2I), self.name, *self._params)

    @property
    def _params(self) -> tuple[float | None, ...]:
        return self.limit, self.alpha, self.gate_softcap, self.up_softcap

    def backward(self, dh_SI: torch.Tensor, gate_up_S2I: torch.Tensor) -> torch.Tensor:
        """`d gate_up [S, 2I]` in the same column layout as `gate_up_S2I` (`[S, I]` non-gated)."""
        if not self.gated:
            return ungated_backward(dh_SI, gate_up_S2I, self.name)
        d_gate, d_up = activation_backward(dh_SI, *self.split(gate_up_S2I), self.name, *self._params)
        d_gate_up = torch.empty_like(gate_up_S2I)
        d_gate_view, d_up_view = self.split(d_gate_up)
        d_gate_view.copy_(d_gate)
        d_up_view.copy_(d_up)
        return d_gate_up
