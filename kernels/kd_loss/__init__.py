"""Knowledge-distillation losses: `kd_loss`, `fused_linear_kd_loss` and their references.

The contract (divergences, temperatures, rows, reductions, NaN policy) is in api.py's docstring.
Layout: teacher.py (the `TeacherHead` / `SparseTeacher` inputs), reference.py (PyTorch loss,
gradient and backward), triton.py (kernels and launchers), fused_linear.py (the chunked pass of
the fused LM head), op.py (the `torch.library` custom ops), api.py (the public functions and
their validation).
"""

from .api import fused_linear_kd_loss, kd_loss
from .reference import fused_linear_kd_loss_reference, kd_loss_reference
from .teacher import SparseTeacher, TeacherHead

__all__ = [
    "SparseTeacher",
    "TeacherHead",
    "fused_linear_kd_loss",
    "fused_linear_kd_loss_reference",
    "kd_loss",
    "kd_loss_reference",
]
