"""padd.moe: the MoE layer on padd's kernels, transformers integration and routing control."""

from .routing_control import RoutingControl

__all__ = ["RoutingControl"]
