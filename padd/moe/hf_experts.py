"""transformers integration: `experts_implementation="padd"` runs HF experts on padd's kernels.

transformers 5 dispatches every `@use_experts_implementation` experts module (Mixtral, Qwen3-MoE,
OLMoE, Qwen2-MoE, ...) through `ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`, and
validates the name against the same registry (`get_correct_experts_implementation`). Registering
one function there is all it takes for both
`AutoModelForCausalLM.from_pretrained(path, experts_implementation="padd")` and
`model.set_experts_implementation("padd")`; no model class is touched.

The router stays transformers' own (or whatever `RoutingControl` makes of it): this function
receives its decisions and runs the experts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface

from padd.kernels import moe_ffn, routing_from_topk

from .experts_layout import check_fused_swiglu

__all__ = [
    "EXPERTS_IMPLEMENTATION",
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
    """The experts forward of a transformers fused-experts module, on `padd.kernels.moe_ffn`.

    Args:
        self: the experts module (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`).
        hidden_states: `[T, H]`.
        top_k_index: `[T, K]` expert ids from the router.
        top_k_weights: `[T, K]` routing weights (differentiable).

    Returns:
        `[T, H]` in `hidden_states.dtype`.
    """
    check_fused_swiglu(self)
    weight_dtype = self.gate_up_proj.dtype
    num_experts = self.gate_up_proj.shape[0]
    routing = routing_from_topk(top_k_index, top_k_weights.float(), num_experts)
    # Under autocast the input may be fp32 while the weights are bf16: the kernels need one dtype.
    out_TH = moe_ffn(hidden_states.to(weight_dtype), self.gate_up_proj, self.down_proj, routing)
    return out_TH.to(hidden_states.dtype)


def experts_implementations() -> list[str]:
    """The names transformers accepts as `experts_implementation` ("padd" once registered)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return sorted({"eager", *ALL_EXPERTS_FUNCTIONS.valid_keys()})


def use_experts(model: nn.Module, implementation: str = EXPERTS_IMPLEMENTATION) -> nn.Module:
    """Run `model`'s MoE experts through `implementation`; returns the model.

    For "padd" every experts module is checked first, so an unsupported one (biased or
    non-SwiGLU experts) fails here, before any compute. A dense model is left as it is.
    The choice lives on the in-memory config only: a saved checkpoint loads with transformers'
    own default.
    """
    if implementation not in experts_implementations():
        raise ValueError(
            f"experts_implementation must be one of {experts_implementations()}, got {implementation!r}"
        )
    experts = [m for m in model.modules() if _is_fused_experts(m)]
    if not experts:
        return model
    if implementation == EXPERTS_IMPLEMENTATION:
        for module in experts:
            check_fused_swiglu(module)
    model.set_experts_implementation(implementation)
    return model


def _is_fused_experts(module: nn.Module) -> bool:
    weight = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return isinstance(weight, torch.Tensor) and weight.dim() == 3


def register() -> None:
    """Add "padd" to transformers' experts registry (idempotent; done by `import padd`)."""
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, padd_experts_forward)
