"""Finding the routers of a transformers MoE model: the one lookup that `RoutingControl` (which
steers them) and `TiedRouterGroups` (which keeps tied rows tied) both build on."""

from __future__ import annotations

from torch import nn

__all__ = ["find_moe_routers"]


def find_moe_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The `(name, router)` of every transformers sparse MoE block of `model`, in layer order.

    A sparse MoE block is a module with a `gate` router (carrying `top_k`, `num_experts` and a
    `[E, H]` `weight`) and fused `experts` (`gate_up_proj`). Registration order of
    `named_modules()` follows the decoder layers' `ModuleList`, hence layer order.
    """
    routers = []
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        experts = getattr(module, "experts", None)
        if not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module):
            continue
        if all(hasattr(gate, a) for a in ("top_k", "num_experts", "weight")) and hasattr(
            experts, "gate_up_proj"
        ):
            routers.append((f"{name}.gate" if name else "gate", gate))
    return routers
