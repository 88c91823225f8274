"""padd.kernels: Triton kernels for MoE routing, grouped expert GEMMs and distillation losses.

Every kernel has a pure-PyTorch reference beside it (the CPU path and the test oracle). The
kernels know nothing of PADD.
"""

# This folder is installed as `padd.kernels`. Run from the repository root, Python can also
# find it as a top-level `kernels`, which transformers probes for (the hub `kernels` package).
# Imported under that name it stays an empty module, so nothing is registered twice.
if __name__ == "padd.kernels":
    from .grouped_gemm import moe_ffn, moe_ffn_reference
    from .kd_loss import SparseTeacher, TeacherHead, fused_linear_kd_loss, kd_loss, kd_loss_reference
    from .routing import Routing, route, route_reference, routing_from_topk, routing_metadata

__all__ = [
    "Routing",
    "SparseTeacher",
    "TeacherHead",
    "fused_linear_kd_loss",
    "kd_loss",
    "kd_loss_reference",
    "moe_ffn",
    "moe_ffn_reference",
    "route",
    "route_reference",
    "routing_from_topk",
    "routing_metadata",
]
