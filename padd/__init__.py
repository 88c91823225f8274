"""padd: Path-Aligned Decompression Distillation, a dense LLM into an MoE student at equal FLOPs."""

from .moe import RoutingControl

__version__ = "0.1.0"

__all__ = ["RoutingControl", "__version__"]
