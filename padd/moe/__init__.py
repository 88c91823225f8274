"""padd.moe: the MoE layer on padd's kernels, transformers integration and routing control.

Importing it registers `experts_implementation="padd"` in transformers' experts registry.
"""

from . import hf_experts
from .layer import MoE
from .router_groups import TiedRouterGroups
from .routing_control import RoutingControl

hf_experts.register()

__all__ = ["MoE", "RoutingControl", "TiedRouterGroups"]
