"""Pure-PyTorch expert FFN: the CPU path and the oracle for the grouped GEMM kernels.

Shape legend: T tokens, H hidden, I expert width, E experts, K top_k, S = T·K slots.
Weights use transformers' fused-experts layout: `gate_up_proj_E2IH` holds the gate rows, then
the up rows; `down_proj_EHI`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing.metadata import Routing


def moe_ffn_reference(
    x_TH: torch.Tensor,
    gate_up_proj_E2IH: torch.Tensor,
    down_proj_EHI: torch.Tensor,
    routing: Routing,
) -> torch.Tensor:
    """`Σ_j w_tj · down_e(silu(gate_e x_t) * up_e x_t)` over each token's K experts, in fp32.

    Loops over experts with data-dependent slicing (a host sync): fine as a CPU path and oracle.
    Returns `[T, H]` in `x_TH.dtype`. Differentiable in x, both weights and `routing.weights_TK`.
    """
    num_tokens, hidden = x_TH.shape
    top_k = routing.top_k
    inter = down_proj_EHI.shape[2]
    order_S = routing.sort_order_S.long()
    token_of_sorted_slot_S = order_S // top_k
    x_sorted_SH = x_TH.float().index_select(0, token_of_sorted_slot_S)
    offsets = routing.expert_offsets_E1.tolist()
    outs = []
    for e in range(routing.num_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            continue
        x_e = x_sorted_SH[lo:hi]
        gate_up = F.linear(x_e, gate_up_proj_E2IH[e].float())
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        outs.append(F.linear(h, down_proj_EHI[e].float()))
    if outs:
        y_sorted_SH = torch.cat(outs, dim=0)
    else:
        y_sorted_SH = x_sorted_SH.new_zeros(0, hidden)
    # Back to slot order, weight, and sum each token's K slots: deterministic, no atomics.
    y_SH = y_sorted_SH.index_select(0, routing.inverse_order_S.long())
    y_TKH = y_SH.view(num_tokens, top_k, hidden) * routing.weights_TK.float().unsqueeze(-1)
    return y_TKH.sum(dim=1).to(x_TH.dtype)
