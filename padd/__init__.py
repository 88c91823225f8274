"""padd: Path-Aligned Decompression Distillation, a dense LLM into an MoE student at equal FLOPs."""

__version__ = "0.1.0"
