"""Grouped expert FFN (SwiGLU experts over a `Routing`).

reference.py: PyTorch forward + hand-written backward; triton.py: kernels and launchers;
op.py: the `padd::moe_ffn` custom ops; api.py: `moe_ffn` with its validation.
"""

from .api import moe_ffn
from .op import moe_ffn_flops
from .reference import moe_ffn_reference

__all__ = ["moe_ffn", "moe_ffn_flops", "moe_ffn_reference"]
