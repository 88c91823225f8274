"""Tied router groups: experts `g·k … g·k + k − 1` share one router row (and one selection bias).

A student built with `decompress(init="exact")` records its group size k in its config
(`padd_router_group_size`). Top-k then always selects one whole group at weights 1/k, which is
what makes the student equal its teacher for any router. Training must keep the rows equal:
the task loss's gradient on the two logits of a chosen pair is equal and opposite (renormalised
weights see only their difference), so left alone it would untie them. `TiedRouterGroups`
averages each router's weight gradient within its groups (which cancels that term exactly and
keeps any group-level objective's gradient), so an optimiser that treats equal rows with equal
gradients equally (SGD, Adam, AdamW) keeps them equal.
"""

from __future__ import annotations

import torch
from torch import nn

from .routers import find_moe_routers

__all__ = ["GROUP_SIZE_KEY", "TiedRouterGroups", "group_mean", "router_group_size"]

GROUP_SIZE_KEY = "padd_router_group_size"


def router_group_size(model: nn.Module) -> int:
    """k when the model's router rows are tied in groups of k, else 1."""
    return int(getattr(getattr(model, "config", None), GROUP_SIZE_KEY, 1) or 1)


def group_mean(x_E: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each group of `group_size` consecutive rows (dim 0) replaced by its mean."""
    e = x_E.shape[0]
    if e % group_size:
        raise ValueError(f"{e} experts do not form groups of {group_size}")
    g = x_E.reshape(e // group_size, group_size, *x_E.shape[1:]).mean(1, keepdim=True)
    return g.expand(-1, group_size, *x_E.shape[1:]).reshape(x_E.shape)


class TiedRouterGroups:
    """Gradient hooks that keep a model's tied router rows tied (a no-op for group size 1).

    Example:
        >>> with TiedRouterGroups(student):
        ...     loss.backward(); optimizer.step()  # router rows stay equal within groups
    """

    def __init__(self, model: nn.Module, group_size: int | None = None) -> None:
        self.group_size = router_group_size(model) if group_size is None else group_size
        self.routers = [r for _, r in find_moe_routers(model)]
        self._handles = []
        if self.group_size > 1:
            for router in self.routers:
                if router.weight.shape[0] % self.group_size:
                    raise ValueError(
                        f"router of {router.weight.shape[0]} experts cannot form groups of {self.group_size}"
                    )
                if router.weight.requires_grad:
                    self._handles.append(router.weight.register_hook(self._average))

    def _average(self, grad: torch.Tensor) -> torch.Tensor:
        return group_mean(grad, self.group_size)

    def max_untied(self) -> float:
        """Largest |row − group mean| over all routers (0.0 when every group is tied)."""
        if self.group_size == 1:
            return 0.0
        with torch.no_grad():
            return max(
                float((r.weight - group_mean(r.weight, self.group_size)).abs().max()) for r in self.routers
            )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> TiedRouterGroups:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
