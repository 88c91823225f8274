"""transformers integration: `experts_implementation="padd"` runs HF experts on padd's kernels.

transformers 5 dispatches every `@use_experts_implementation` experts module through
`ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`, and validates the name against the same
registry. Registering one function there is all it takes for both
`AutoModelForCausalLM.from_pretrained(path, experts_implementation="padd")` and
`model.set_experts_implementation("padd")`.

Each experts module runs as its plan says (`experts_plan.plan_experts`): fused in
`padd.kernels.moe_ffn` when its `_apply_gate` (or, for experts without a gate, its `act_fn` on the
`up_proj` output) is one of the kernels' activations, otherwise the
general path (padd's routing metadata and grouped GEMMs with the module's own `_apply_gate`,
`act_fn` and `post_expert_norm` between them), so the answer is the module's own either way.
A module padd cannot run is refused when the model is built or switched to "padd" (`register`
wraps `PreTrainedModel.post_init` and `set_experts_implementation` for that), with one line naming
the module and the reason.

The router stays transformers' own (or whatever `RoutingControl` makes of it): this function
receives its decisions and runs the experts. Under expert parallelism an id equal to E marks a
token routed to another rank; it contributes zero, as in transformers' own backends.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations.moe import ExpertsInterface

from padd.kernels import Routing, moe_ffn, routing_from_topk

from .experts_plan import ExpertsLayout, ExpertsPlan, is_experts_module, plan_experts

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "check_model",
    "experts_implementations",
    "padd_experts_forward",
    "register",
    "use_experts",
]

EXPERTS_IMPLEMENTATION = "padd"


def padd_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts forward of a transformers experts module, on padd's kernels.

    Args:
        self: the experts module (any layout its `@use_experts_implementation` flags declare).
        hidden_states: `[T, H]`.
        top_k_index: `[T, K]` expert ids from the router (E marks another rank's expert).
        top_k_weights: `[T, K]` routing weights (differentiable).

    Returns:
        `[T, H]` in `hidden_states.dtype`.
    """
    plan = plan_experts(self)
    layout = plan.layout
    top_k_weights = top_k_weights.float()
    if layout.expert_parallel:
        # Another rank's tokens: weight 0 (no output, no router gradient) on an in-range expert.
        sentinel = top_k_index >= layout.num_experts
        top_k_weights = top_k_weights.masked_fill(sentinel, 0.0)
        top_k_index = top_k_index.clamp(max=layout.num_experts - 1)
    routing = routing_from_topk(top_k_index, top_k_weights, layout.num_experts)
    # Under autocast the input may be fp32 while the weights are bf16: the kernels need one dtype.
    first = layout.first_weight(self)
    x_TH = hidden_states.to(first.dtype)
    if plan.fused:
        gate_up_bias, down_bias = layout.biases(self)
        act = plan.activation
        out_TH = moe_ffn(
            x_TH,
            first,
            layout.down_weight(self),
            routing,
            activation=act.name,
            limit=act.limit,
            alpha=act.alpha,
            gate_up_interleaved=act.interleaved,
            gate_softcap=act.gate_softcap,
            up_softcap=act.up_softcap,
            gate_up_bias=gate_up_bias,
            down_bias=down_bias,
        )
    else:
        out_TH = _general_forward(self, layout, x_TH, routing)
    return out_TH.to(hidden_states.dtype)


def _grouped_linear(a_SK: torch.Tensor, w_ENK: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`a[rows of e] @ w[e].T` for each expert's block of expert-sorted rows, in a's dtype."""
    blocks = [
        F.linear(a, w) for n, a, w in zip(counts, a_SK.split(counts), w_ENK.unbind(0), strict=True) if n
    ]
    return torch.cat(blocks) if blocks else a_SK.new_empty(0, w_ENK.shape[1])


def _general_forward(
    experts: nn.Module, layout: ExpertsLayout, x_TH: torch.Tensor, routing: Routing
) -> torch.Tensor:
    """The module's own computation, step for step as transformers' `grouped_mm` backend does it,
    on padd's routing metadata: grouped GEMM, `_apply_gate` (or `act_fn`), grouped GEMM,
    `post_expert_norm`, routing weight, deterministic sum of each token's K slots."""
    num_tokens, top_k = routing.num_tokens, routing.top_k
    order_S = routing.sort_order.long()
    counts = routing.tokens_per_expert.tolist()
    expert_S = routing.expert_ids.reshape(-1).long().index_select(0, order_S)
    first_bias, down_bias = layout.biases(experts)
    proj_SN = _grouped_linear(x_TH.index_select(0, order_S // top_k), layout.first_weight(experts), counts)
    if first_bias is not None:
        proj_SN = proj_SN + first_bias.index_select(0, expert_S)
    h_SI = experts._apply_gate(proj_SN) if layout.has_gate else experts.act_fn(proj_SN)
    y_SH = _grouped_linear(h_SI, layout.down_weight(experts), counts)
    if down_bias is not None:
        y_SH = y_SH + down_bias.index_select(0, expert_S)
    if layout.has_post_expert_norm:
        y_SH = experts.post_expert_norm(y_SH)
    y_SH = y_SH.index_select(0, routing.inverse_order.long()) * routing.weights.reshape(-1, 1)
    return y_SH.view(num_tokens, top_k, -1).sum(dim=1)


def experts_implementations() -> list[str]:
    """The names transformers accepts as `experts_implementation` ("padd" once registered)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return sorted({"eager", *ALL_EXPERTS_FUNCTIONS.valid_keys()})


def check_model(model: nn.Module, implementation: str | None = None) -> dict[str, ExpertsPlan]:
    """Plan every experts module of `model` that runs (or would run) on padd.

    Args:
        model: any module.
        implementation: check the modules as if set to this; None: those whose config says "padd".

    Returns:
        `{module name: plan}`; raises `NotImplementedError` with one line for a refused module.
    """
    plans = {}
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        chosen = implementation or getattr(getattr(module, "config", None), "_experts_implementation", None)
        if chosen == EXPERTS_IMPLEMENTATION:
            try:
                plans[name] = plan_experts(module)
            except NotImplementedError as error:
                raise NotImplementedError(f"{name or type(module).__name__}: {error}") from None
    return plans


def use_experts(model: nn.Module, implementation: str = EXPERTS_IMPLEMENTATION) -> nn.Module:
    """Run `model`'s MoE experts through `implementation`; returns the model.

    For "padd" every experts module is planned first, so an unsupported one fails here, before
    any compute. A dense model is left as it is. The choice lives on the in-memory config only:
    a saved checkpoint loads with transformers' own default.
    """
    if implementation not in experts_implementations():
        raise ValueError(
            f"experts_implementation must be one of {experts_implementations()}, got {implementation!r}"
        )
    if not any(is_experts_module(m) for m in model.modules()):
        return model
    if implementation == EXPERTS_IMPLEMENTATION:
        check_model(model, implementation)
    model.set_experts_implementation(implementation)
    return model


def _checked_post_init(post_init):
    @functools.wraps(post_init)
    def wrapper(self, *args, **kwargs):
        result = post_init(self, *args, **kwargs)
        check_model(self)
        return result

    wrapper._padd_checked = True
    return wrapper


def _checked_set_experts_implementation(set_impl):
    @functools.wraps(set_impl)
    def wrapper(self, experts_implementation, *args, **kwargs):
        before = self.get_experts_implementation()
        result = set_impl(self, experts_implementation, *args, **kwargs)
        try:
            check_model(self)
        except NotImplementedError:
            set_impl(self, before)  # leave the model as it was
            raise
        return result

    wrapper._padd_checked = True
    return wrapper


def register() -> None:
    """Add "padd" to transformers' experts registry and check models that choose it when they
    are built or switched (idempotent; done by `import padd`)."""
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, padd_experts_forward)
    if not getattr(PreTrainedModel.post_init, "_padd_checked", False):
        PreTrainedModel.post_init = _checked_post_init(PreTrainedModel.post_init)
    if not getattr(PreTrainedModel.set_experts_implementation, "_padd_checked", False):
        PreTrainedModel.set_experts_implementation = _checked_set_experts_implementation(
            PreTrainedModel.set_experts_implementation
        )
