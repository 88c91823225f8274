"""padd: Path-Aligned Decompression Distillation, a dense LLM into an MoE student at equal FLOPs.

`import padd` registers `experts_implementation="padd"` in transformers (see `padd.moe`).
"""

from . import decompress, flops
from .moe import MoE, RoutingControl

__version__ = "0.1.0"

__all__ = ["MoE", "RoutingControl", "__version__", "decompress", "flops"]
