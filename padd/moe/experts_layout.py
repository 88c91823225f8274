"""The check that a decompressed student's experts are in the layout decompression fills.

Decompression (`padd.decompress.convert`) writes transformers' fused SwiGLU experts:
`gate_up_proj [E, 2I, H]` (gate rows, then up rows) and `down_proj [E, H, I]`, silu, no biases,
no norm after the experts, and every expert on this rank.
transformers describes other layouts with flags on the experts module (`is_transposed`, ...);
checking them, not the shapes alone, is what tells `[E, H, 2I]` from `[E, 2I, H]` when H = 2I.
"""

from __future__ import annotations

from torch import nn

__all__ = ["check_fused_swiglu"]

# transformers' experts flags, and the value padd's layout needs (an absent flag means it).
_FLAGS = {
    "has_gate": True,
    "has_bias": False,
    "is_transposed": False,
    "is_concatenated": True,
    "has_post_expert_norm": False,
    "_is_expert_parallel": False,  # gate_up_proj would hold this rank's experts only
}


def check_fused_swiglu(experts: nn.Module) -> tuple[int, int, int]:
    """Raise `NotImplementedError` unless `experts` holds fused SwiGLU experts in padd's layout.

    Args:
        experts: a transformers experts module (`block.experts` of a sparse MoE block).

    Returns:
        `(E, I, H)`: experts, intermediate width, hidden size.
    """
    name = type(experts).__name__
    problems = [
        f"{flag}={not wanted}" for flag, wanted in _FLAGS.items() if getattr(experts, flag, wanted) != wanted
    ]
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"hidden_act={act!r}")
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if gate_up is None or down is None:
        problems.append("no gate_up_proj / down_proj")
    elif gate_up.dim() != 3 or down.dim() != 3:
        problems.append(f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} not 3-D")
    else:
        e, two_i, h = gate_up.shape
        if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
            problems.append(
                f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not "
                "[E, 2I, H] and [E, H, I]"
            )
    if problems:
        raise NotImplementedError(
            f"padd runs fused SwiGLU experts only ([gate; up] concatenated as gate_up_proj [E, 2I, H], "
            f"down_proj [E, H, I], silu, no bias, no expert parallelism); {name} has {', '.join(problems)}"
        )
    return e, two_i // 2, h
