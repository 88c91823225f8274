"""padd.kernels: Triton kernels for MoE routing, grouped expert GEMMs and distillation losses.

Every kernel has a pure-PyTorch reference beside it (the CPU path and the test oracle). The
kernels know nothing of PADD.
"""

from .grouped_gemm import moe_ffn, moe_ffn_reference
from .kd_loss import kd_loss
from .routing import Routing, route, route_reference, routing_from_topk, routing_metadata

__all__ = [
    "Routing",
    "kd_loss",
    "moe_ffn",
    "moe_ffn_reference",
    "route",
    "route_reference",
    "routing_from_topk",
    "routing_metadata",
]
