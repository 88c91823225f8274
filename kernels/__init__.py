"""padd.kernels: Triton kernels for MoE routing, grouped expert GEMMs and distillation losses.

Every kernel has a pure-PyTorch reference beside it (the CPU path and the test oracle). The
kernels know nothing of PADD.
"""

# This folder is installed as `padd.kernels`. Run from the repository root (`python -m ...`
# puts the working directory first on sys.path), Python also finds it as a top-level `kernels`:
# the name of the hub `kernels` package, which transformers (>= 5.25) requires and imports.
# Imported under that name, this module hands over to the installed package, or fails as if the
# name were absent, so neither transformers nor padd ever sees this folder as `kernels`.
if __name__ == "kernels":
    from ._shadow import hand_over_to_installed_kernels

    hand_over_to_installed_kernels()
else:
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
