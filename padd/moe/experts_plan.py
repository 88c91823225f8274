"""How padd runs one transformers experts module: fused, through the general path, or refused.

transformers describes an experts module's layout with the flags `@use_experts_implementation`
sets on it (`has_gate`, `has_bias`, `is_transposed`, `is_concatenated`, `has_post_expert_norm`,
`_is_expert_parallel`) and its gating with the class's `_apply_gate`, which its own
`grouped_mm` / `batched_mm` backends call between the two GEMMs. padd decides from the same two
things, never from config names:

- the layout comes from the flags and the weights' shapes;
- the activation is recognised by *running* the module's own `_apply_gate` on a probe whose
  entries reach far past any clamp or soft cap, and comparing it with each activation padd's
  kernels fuse (`padd.kernels.grouped_gemm.activation`), parameterised by the module's `limit` /
  `alpha` attributes and its soft caps (`gate_softcap` / `up_softcap` on the module or its
  `act_fn`, each a number or a module holding a `softcap` number: Inkling2's
  `Inkling2SoftcappedSwiGLU`). Experts without a gate (`has_gate=False`: Nemotron-H, Ergo) are
  recognised the same way from their `act_fn`, run on a probe of up pre-activations and compared
  with the non-gated activations (`relu2`, `relu`, `silu`, `gelu`). A match runs fused
  (`moe_ffn`); anything else (an unknown activation, an `_apply_gate` that computes other caps
  than the module's attributes say, a norm after the experts) runs the general path, padd's
  grouped GEMMs with the module's own `_apply_gate` / `act_fn` between them: slower, never
  different.

Refused (one line, before any compute): weights that are missing, not floating point or not in the
shapes the flags declare, and modules that lack what their flags promise (`act_fn`,
`post_expert_norm`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from padd.kernels.grouped_gemm.activation import UNGATED_ACTIVATIONS, GatedActivation

__all__ = ["ExpertsLayout", "ExpertsPlan", "is_experts_module", "plan_experts"]

# transformers' layout flags and their values when a module does not set them.
_FLAG_DEFAULTS = {
    "has_gate": True,
    "has_bias": False,
    "is_transposed": False,
    "is_concatenated": True,
    "has_post_expert_norm": False,
    "_is_expert_parallel": False,
}
# Attribute names transformers' experts classes give the clamp bound and GPT-OSS's α.
_LIMIT_NAMES = ("limit", "swiglu_limit")
_ALPHA_NAMES = ("alpha", "swiglu_alpha")
# Attribute names of the soft caps of "swiglu_softcap", looked up on the experts module and on its
# `act_fn`; each holds the cap itself or a module with a `softcap` number (Inkling2's
# `act_fn.gate_softcap = Inkling2Softcap(config.mlp_gate_softcap)`).
_GATE_SOFTCAP_NAMES = ("gate_softcap", "mlp_gate_softcap")
_UP_SOFTCAP_NAMES = ("up_softcap", "mlp_up_softcap")
_PROBE_ROWS = 16


@dataclass(frozen=True)
class ExpertsLayout:
    """An experts module's weights as `moe_ffn` takes them: `[E, 2I, H]` / `[E, H, I]` views.

    Attributes:
        num_experts, hidden, inter: E, H, I.
        has_gate: the first projection is `gate_up_proj` (else `up_proj`, width I).
        is_transposed: the stored weights are `[E, H, ·]` / `[E, I, H]` (views undo it).
        has_bias: `*_proj_bias` tensors are added after each projection.
        has_post_expert_norm: `post_expert_norm` runs on each expert's output.
        expert_parallel: ids equal to E mark tokens routed to another rank.
    """

    num_experts: int
    hidden: int
    inter: int
    has_gate: bool
    is_transposed: bool
    has_bias: bool
    has_post_expert_norm: bool
    expert_parallel: bool

    def first_weight(self, experts: nn.Module) -> torch.Tensor:
        """`[E, 2I, H]` (gated) or `[E, I, H]`: the gate/up (or up) projection, as a view."""
        weight = experts.gate_up_proj if self.has_gate else experts.up_proj
        return weight.transpose(1, 2) if self.is_transposed else weight

    def down_weight(self, experts: nn.Module) -> torch.Tensor:
        """`[E, H, I]`, as a view."""
        return experts.down_proj.transpose(1, 2) if self.is_transposed else experts.down_proj

    def biases(self, experts: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.has_bias:
            return None, None
        first = experts.gate_up_proj_bias if self.has_gate else experts.up_proj_bias
        return first, experts.down_proj_bias


@dataclass(frozen=True)
class ExpertsPlan:
    """What padd runs for one experts module.

    Attributes:
        layout: the module's weights (`ExpertsLayout`).
        activation: the fused activation, or None for the general path.
        why: one line: the activation recognised, or why the general path runs.
    """

    layout: ExpertsLayout
    activation: GatedActivation | None
    why: str

    @property
    def fused(self) -> bool:
        return self.activation is not None


def is_experts_module(module: nn.Module) -> bool:
    """True for an instance of a class decorated with transformers' `@use_experts_implementation`
    (the decorator gives every instance `has_gate` and `_is_expert_parallel`)."""
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "_is_expert_parallel")
        and hasattr(module, "_apply_gate")
    )


def _flag(experts: nn.Module, name: str) -> bool:
    return bool(getattr(experts, name, _FLAG_DEFAULTS[name]))


def _refuse(experts: nn.Module, what: str) -> NotImplementedError:
    return NotImplementedError(f"padd cannot run {type(experts).__name__}: {what}")


def read_layout(experts: nn.Module) -> ExpertsLayout:
    """The layout the module's flags declare, checked against its weights (raises one line)."""
    has_gate, transposed = _flag(experts, "has_gate"), _flag(experts, "is_transposed")
    first_name = "gate_up_proj" if has_gate else "up_proj"
    first, down = getattr(experts, first_name, None), getattr(experts, "down_proj", None)
    if not isinstance(first, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise _refuse(experts, f"no {first_name} / down_proj tensors")
    if first.dim() != 3 or down.dim() != 3:
        raise _refuse(
            experts, f"{first_name} {tuple(first.shape)} and down_proj {tuple(down.shape)} are not 3-D"
        )
    for name, weight in ((first_name, first), ("down_proj", down)):
        if not weight.is_floating_point() or weight.element_size() < 2:
            raise _refuse(experts, f"{name} is {weight.dtype} (quantised experts are not supported)")
    num_experts = first.shape[0]
    hidden, width = (first.shape[1], first.shape[2]) if transposed else (first.shape[2], first.shape[1])
    inter = width // 2 if has_gate else width
    want_down = (num_experts, inter, hidden) if transposed else (num_experts, hidden, inter)
    if (has_gate and width % 2) or tuple(down.shape) != want_down:
        stored = "[E, H, 2I] and [E, I, H]" if transposed else "[E, 2I, H] and [E, H, I]"
        if not has_gate:
            stored = stored.replace("2I", "I")
        raise _refuse(
            experts,
            f"{first_name} {tuple(first.shape)} and down_proj {tuple(down.shape)} are not {stored} "
            f"(is_transposed={transposed})",
        )
    layout = ExpertsLayout(
        num_experts=num_experts,
        hidden=hidden,
        inter=inter,
        has_gate=has_gate,
        is_transposed=transposed,
        has_bias=_flag(experts, "has_bias"),
        has_post_expert_norm=_flag(experts, "has_post_expert_norm"),
        expert_parallel=_flag(experts, "_is_expert_parallel"),
    )
    _check_extras(experts, layout, first_name)
    return layout


def _check_extras(experts: nn.Module, layout: ExpertsLayout, first_name: str) -> None:
    if layout.has_bias:
        for name, size in (
            (f"{first_name}_bias", (2 if layout.has_gate else 1) * layout.inter),
            ("down_proj_bias", layout.hidden),
        ):
            bias = getattr(experts, name, None)
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (layout.num_experts, size):
                raise _refuse(
                    experts, f"has_bias=True but {name} is not a [{layout.num_experts}, {size}] tensor"
                )
    if not layout.has_gate and not callable(getattr(experts, "act_fn", None)):
        raise _refuse(experts, "has_gate=False but no act_fn to apply")
    if layout.has_post_expert_norm and not callable(getattr(experts, "post_expert_norm", None)):
        raise _refuse(experts, "has_post_expert_norm=True but no post_expert_norm module")


def _numbers(experts: nn.Module, names: tuple[str, ...]) -> list[float]:
    values = [getattr(experts, n, None) for n in names]
    return sorted({float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)})


def _as_number(value) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _softcaps(experts: nn.Module, names: tuple[str, ...]) -> list[float]:
    """The finite positive soft caps the module (or its `act_fn`) holds under `names`: a number,
    or a module's numeric `softcap` attribute (Inkling2's `Inkling2Softcap`)."""
    owners = [experts]
    act_fn = getattr(experts, "act_fn", None)
    if isinstance(act_fn, nn.Module):
        owners.append(act_fn)
    found = set()
    for owner in owners:
        for name in names:
            value = getattr(owner, name, None)
            cap = _as_number(getattr(value, "softcap", None) if isinstance(value, nn.Module) else value)
            if cap is not None and 0 < cap < math.inf:
                found.add(cap)
    return sorted(found)


def _candidates(experts: nn.Module) -> list[GatedActivation]:
    """Every fused activation the module's attributes could parameterise, plain SwiGLU first."""
    limits = [v for v in _numbers(experts, _LIMIT_NAMES) if v > 0]
    alphas = _numbers(experts, _ALPHA_NAMES)
    gate_caps, up_caps = _softcaps(experts, _GATE_SOFTCAP_NAMES), _softcaps(experts, _UP_SOFTCAP_NAMES)
    out = []
    for interleaved in (False, True):
        out.append(GatedActivation("swiglu", interleaved=interleaved))
        for limit in limits:
            out.append(GatedActivation("swiglu_limit", limit, interleaved=interleaved))
            out.append(GatedActivation("swiglu_limit_post", limit, interleaved=interleaved))
            out.extend(GatedActivation("gpt_oss", limit, alpha, interleaved) for alpha in alphas)
        out.extend(
            GatedActivation("swiglu_softcap", interleaved=interleaved, gate_softcap=c_g, up_softcap=c_u)
            for c_g in gate_caps
            for c_u in up_caps
        )
    return out


def _probe(inter: int, limits: list[float], width: int = 2) -> torch.Tensor:
    """`[R, width·I]` fp32 values spread over ±3·max(limits, 8): every clamp acts on some entries
    (and every soft cap c saturates: `tanh(3)` ≈ 0.995, where a wrong cap shows)."""
    span = 3.0 * max([8.0, *limits])
    # Explicit device and dtype: models are built under a `torch.device("meta")` context and
    # with the default dtype set to the model's.
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.rand(_PROBE_ROWS, width * inter, generator=generator, device="cpu", dtype=torch.float32)
    probe = (probe * 2 - 1) * span
    probe[0, : width * inter : 7] = 0.0  # exact zeros: GPT-OSS's `up + 1` and sign handling
    probe[1] /= span  # small values too: where SiLU, GELU and the ReLUs differ most
    return probe


def recognise_activation(experts: nn.Module, inter: int) -> tuple[GatedActivation | None, str]:
    """The fused activation equal to `experts._apply_gate` on a wide probe, or None and why."""
    limits = _numbers(experts, _LIMIT_NAMES)
    caps = _softcaps(experts, _GATE_SOFTCAP_NAMES) + _softcaps(experts, _UP_SOFTCAP_NAMES)
    probe = _probe(inter, [*limits, *caps])
    try:
        with torch.no_grad():
            got = experts._apply_gate(probe)
    except Exception as error:  # an _apply_gate that needs its module's device or dtype
        return None, f"its _apply_gate could not be probed on the CPU ({type(error).__name__})"
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (_PROBE_ROWS, inter):
        return None, "its _apply_gate does not map [S, 2I] to [S, I]"
    got = got.float()
    for candidate in _candidates(experts):
        if torch.allclose(got, candidate.forward(probe), rtol=1e-5, atol=1e-5, equal_nan=True):
            return candidate, f"{type(experts).__name__}._apply_gate == {_describe(candidate)}"
    return None, f"{type(experts).__name__}._apply_gate is none of padd's fused activations"


def recognise_ungated_activation(experts: nn.Module, inter: int) -> tuple[GatedActivation | None, str]:
    """The fused non-gated activation equal to `experts.act_fn` on a wide probe, or None and why."""
    probe = _probe(inter, [], width=1)
    try:
        with torch.no_grad():
            got = experts.act_fn(probe.clone())  # a clone: an in-place act_fn must not spoil the probe
    except Exception as error:
        return None, f"its act_fn could not be probed on the CPU ({type(error).__name__})"
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(probe.shape):
        return None, "its act_fn does not map [S, I] to [S, I]"
    got = got.float()
    for name in UNGATED_ACTIVATIONS:
        candidate = GatedActivation(name)
        if torch.allclose(got, candidate.forward(probe), rtol=1e-5, atol=1e-5, equal_nan=True):
            return candidate, f"no gate: {type(experts).__name__}.act_fn == {name}"
    return None, f"no gate: {type(experts).__name__}.act_fn is none of padd's fused activations"


def _describe(act: GatedActivation) -> str:
    params = [f"limit={act.limit:g}"] if act.limit is not None else []
    params += [f"alpha={act.alpha:g}"] if act.alpha is not None else []
    params += [f"gate_softcap={act.gate_softcap:g}"] if act.gate_softcap is not None else []
    params += [f"up_softcap={act.up_softcap:g}"] if act.up_softcap is not None else []
    params += ["interleaved"] if act.interleaved else []
    return f"{act.name}({', '.join(params)})"


# A plan is cached per module and remade when anything it was read from changes.
_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, ExpertsPlan]] = weakref.WeakKeyDictionary()


def _fingerprint(experts: nn.Module) -> tuple:
    weights = tuple(
        (tuple(t.shape), t.dtype)
        for t in (getattr(experts, n, None) for n in ("gate_up_proj", "up_proj", "down_proj"))
        if isinstance(t, torch.Tensor)
    )
    flags = tuple(_flag(experts, n) for n in _FLAG_DEFAULTS)
    numbers = tuple(getattr(experts, n, None) for n in (*_LIMIT_NAMES, *_ALPHA_NAMES))
    caps = (_softcaps(experts, _GATE_SOFTCAP_NAMES), _softcaps(experts, _UP_SOFTCAP_NAMES))
    return type(experts), weights, flags, numbers, caps, id(getattr(experts, "act_fn", None))


def plan_experts(experts: nn.Module) -> ExpertsPlan:
    """The plan for one experts module; raises `NotImplementedError` (one line) when refused."""
    key = _fingerprint(experts)
    cached = _PLANS.get(experts)
    if cached is not None and cached[0] == key:
        return cached[1]
    layout = read_layout(experts)
    if layout.has_post_expert_norm:
        plan = ExpertsPlan(layout, None, "a norm after each expert: it runs between padd's grouped GEMMs")
    elif not layout.has_gate:
        activation, why = recognise_ungated_activation(experts, layout.inter)
        plan = ExpertsPlan(layout, activation, why)
    else:
        activation, why = recognise_activation(experts, layout.inter)
        plan = ExpertsPlan(layout, activation, why)
    _PLANS[experts] = (key, plan)
    return plan
