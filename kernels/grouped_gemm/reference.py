"""Pure-PyTorch expert FFN with its hand-written backward: the CPU path and the kernels' oracle.

Every gated activation of `activation.py` and optional per-expert biases are computed here; the
Triton kernels fuse the same activations but no biases (`moe_ffn` picks this path for those).

Shape legend: T tokens, H hidden, I expert width, E experts, K top_k, S = T·K slots. "Sorted"
rows are slots in `routing.sort_order` order (grouped by expert).
Weights use transformers' fused-experts layout: `gate_up_proj` `[E, 2I, H]` holds the gate rows,
then the up rows; `down_proj` `[E, H, I]`.

Only the GEMMs loop over experts; every elementwise step runs once over all S slots, which keeps
the CPU path at least as fast as transformers' own `grouped_mm` experts (benchmarks/
bench_padd_step.py). The forward returns the sorted gate/up pre-activations `[S, 2I]` so the
backward reuses them instead of recomputing one GEMM (the Triton backward recomputes instead,
to save GPU memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing.metadata import Routing
from .activation import GatedActivation

SWIGLU = GatedActivation()


def moe_ffn_reference(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: Routing,
    *,
    activation: str = "swiglu",
    limit: float | None = None,
    alpha: float | None = None,
    gate_up_interleaved: bool = False,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`Σ_j w_tj · (down_e(act(gate_up_e x_t + b1_e)) + b2_e)` over each token's K experts, in fp32.

    Args:
        x: `[T, H]`.
        gate_up_proj: `[E, 2I, H]` (any strides: a transposed view is fine).
        down_proj: `[E, H, I]`.
        routing: the `Routing` of these T tokens.
        activation, limit, alpha, gate_up_interleaved: the gated activation (`moe_ffn`).
        gate_up_bias: optional `[E, 2I]`, added to the gate/up GEMM output.
        down_bias: optional `[E, H]`, added to the down GEMM output (before the routing weight).

    Returns:
        `[T, H]` in `x.dtype`. Differentiable by autograd in x, the weights, the biases and
        `routing.weights`. Loops over experts with data-dependent slicing (a host sync).
    """
    act = GatedActivation(activation, limit, alpha, gate_up_interleaved)
    return moe_ffn_reference_forward(x, gate_up_proj, down_proj, routing, act, gate_up_bias, down_bias)[0]


def _expert_of_sorted_slot(routing: Routing, order_S: torch.Tensor) -> torch.Tensor:
    return routing.expert_ids.reshape(-1).long().index_select(0, order_S)


def moe_ffn_reference_forward(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: Routing,
    activation: GatedActivation = SWIGLU,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_ffn_reference`, also returning the sorted gate/up pre-activations `[S, 2I]` (fp32,
    biases included)."""
    num_tokens, hidden = x.shape
    top_k = routing.top_k
    inter = down_proj.shape[2]
    order_S = routing.sort_order.long()
    x_sorted_SH = x.float().index_select(0, order_S // top_k)
    counts = routing.tokens_per_expert.tolist()
    if not any(counts):
        empty = x_sorted_SH.new_zeros(0, 2 * inter)
        return x.new_zeros(num_tokens, hidden), empty
    expert_S = (
        _expert_of_sorted_slot(routing, order_S)
        if gate_up_bias is not None or down_bias is not None
        else None
    )
    if torch.is_grad_enabled():  # autograd records slices and cat, not writes into a buffer
        gate_up_S2I = _grouped_linear(x_sorted_SH, gate_up_proj, counts)
        if gate_up_bias is not None:
            gate_up_S2I = gate_up_S2I + gate_up_bias.float().index_select(0, expert_S)
        h_SI = activation.forward(gate_up_S2I)
        y_sorted_SH = _grouped_linear(h_SI, down_proj, counts)
        if down_bias is not None:
            y_sorted_SH = y_sorted_SH + down_bias.float().index_select(0, expert_S)
    else:  # inside the custom op, or under no_grad (generation): no per-expert copies
        gate_up_S2I = x_sorted_SH.new_empty(x_sorted_SH.shape[0], 2 * inter)
        _grouped_mm_into(x_sorted_SH, gate_up_proj, gate_up_S2I, counts)
        if gate_up_bias is not None:
            gate_up_S2I.add_(gate_up_bias.float().index_select(0, expert_S))
        if activation.is_plain_swiglu:
            h_SI = F.silu(gate_up_S2I[:, :inter]).mul_(gate_up_S2I[:, inter:])
        else:
            h_SI = activation.forward(gate_up_S2I)
        y_sorted_SH = torch.empty_like(x_sorted_SH)
        _grouped_mm_into(h_SI, down_proj, y_sorted_SH, counts)
        if down_bias is not None:
            y_sorted_SH.add_(down_bias.float().index_select(0, expert_S))
    # Back to slot order, weight, and sum each token's K slots: deterministic, no atomics.
    y_SH = y_sorted_SH.index_select(0, routing.inverse_order.long())
    y_TKH = y_SH.view(num_tokens, top_k, hidden) * routing.weights.float().unsqueeze(-1)
    return y_TKH.sum(dim=1).to(x.dtype), gate_up_S2I


def _grouped_linear(a_SK: torch.Tensor, w_ENK: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`a[rows of e] @ w[e].T` for each expert's block of sorted rows, concatenated: the form
    autograd can differentiate (`_grouped_mm_into` writes into a buffer instead)."""
    blocks = zip(counts, a_SK.split(counts), w_ENK.unbind(0), strict=True)
    return torch.cat([F.linear(a, w.float()) for n, a, w in blocks if n])


def _grouped_mm_into(
    a_SK: torch.Tensor, w_ENK: torch.Tensor, out_SN: torch.Tensor, counts: list[int]
) -> None:
    """`out[rows of e] = a[rows of e] @ w[e].T` for each expert's block of sorted rows.

    Views come from one `split`/`unbind` call each, so the Python loop does one GEMM call per
    expert: at decode sizes (a few rows per expert) its overhead rivals the GEMMs themselves.
    """
    weights = w_ENK.float().transpose(1, 2).unbind(0)
    for n, a, w, out in zip(counts, a_SK.split(counts), weights, out_SN.split(counts), strict=True):
        if n:
            torch.mm(a, w, out=out)


def _per_expert_sum(a_SN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`out[e] = Σ rows of e of a`, `[E, N]` fp32: a bias gradient, summed in row order (deterministic)."""
    out = a_SN.new_zeros(len(counts), a_SN.shape[1])
    for n, a, o in zip(counts, a_SN.split(counts), out.unbind(0), strict=True):
        if n:
            torch.sum(a, dim=0, out=o)
    return out


def _per_expert_outer(a_SN: torch.Tensor, b_SK: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`out[e] = a[rows of e].T @ b[rows of e]`, `[E, N, K]` fp32 (zero for an expert with no rows):
    the weight gradient of each expert's GEMM."""
    out = a_SN.new_zeros(len(counts), a_SN.shape[1], b_SK.shape[1])
    for n, a, b, o in zip(counts, a_SN.split(counts), b_SK.split(counts), out.unbind(0), strict=True):
        if n:
            torch.mm(a.t(), b, out=o)
    return out


def moe_ffn_reference_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: Routing,
    gate_up_S2I: torch.Tensor | None = None,
    needs: tuple[bool, bool, bool] = (True, True, True),
    activation: GatedActivation = SWIGLU,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Hand-derived backward of `moe_ffn_reference`, in fp32.

    Written out because autograd is not recorded inside a custom op's implementation.

    Args:
        grad: `[T, H]`, the gradient of the output.
        x, gate_up_proj, down_proj, routing, activation, gate_up_bias, down_bias: the forward's
            inputs.
        gate_up_S2I: the forward's sorted pre-activations (biases included); recomputed when None.
        needs: whether `(dx, d gate_up_proj, d down_proj)` are wanted (None is returned for the
            others). The routing-weight gradient, and each given bias's, is always computed.

    Returns:
        `(dx [T, H], d gate_up_proj [E, 2I, H], d down_proj [E, H, I], d weights [T, K],
        d gate_up_bias [E, 2I] or None, d down_bias [E, H] or None)`, each in its input's dtype.
    """
    needs_dx, needs_d_gate_up, needs_d_down = needs
    num_tokens, hidden = x.shape
    top_k, inter = routing.top_k, down_proj.shape[2]
    order_S = routing.sort_order.long()
    tokens_S = order_S // top_k
    x_SH = x.float().index_select(0, tokens_S)
    dy_SH = grad.float().index_select(0, tokens_S)
    w_S1 = routing.weights.float().reshape(-1).index_select(0, order_S).unsqueeze(1)
    counts = routing.tokens_per_expert.tolist()
    has_bias = gate_up_bias is not None or down_bias is not None
    expert_S = _expert_of_sorted_slot(routing, order_S) if has_bias else None
    if gate_up_S2I is None or gate_up_S2I.shape[0] != x_SH.shape[0]:
        gate_up_S2I = x_SH.new_empty(x_SH.shape[0], 2 * inter)
        _grouped_mm_into(x_SH, gate_up_proj, gate_up_S2I, counts)
        if gate_up_bias is not None:
            gate_up_S2I.add_(gate_up_bias.float().index_select(0, expert_S))

    dh_unweighted_SI = x_SH.new_empty(x_SH.shape[0], inter)
    _grouped_mm_into(dy_SH, down_proj.transpose(1, 2), dh_unweighted_SI, counts)
    if activation.is_plain_swiglu:
        gate_SI, up_SI = gate_up_S2I[:, :inter], gate_up_S2I[:, inter:]
        silu_SI = F.silu(gate_SI)
        h_SI = silu_SI * up_SI
        dw_S = (dh_unweighted_SI * h_SI).sum(dim=1)
        dh_SI = dh_unweighted_SI.mul_(w_S1)
        # [d gate | d up] written in place: d up = dh·silu(gate), d gate = silu'(gate)·dh·up. Each
        # [S, I] pass is memory-bound on CPU, so every temporary saved shows in the step time.
        d_gate_up_S2I = x_SH.new_empty(x_SH.shape[0], 2 * inter)
        torch.mul(dh_SI, silu_SI, out=d_gate_up_S2I[:, inter:])
        torch.ops.aten.silu_backward.grad_input(
            dh_SI.mul_(up_SI), gate_SI, grad_input=d_gate_up_S2I[:, :inter]
        )
    else:
        h_SI = activation.forward(gate_up_S2I)
        dw_S = (dh_unweighted_SI * h_SI).sum(dim=1)
        d_gate_up_S2I = activation.backward(dh_unweighted_SI.mul_(w_S1), gate_up_S2I)
    if down_bias is not None:  # the bias is part of the expert output the routing weight scales
        dw_S += (dy_SH * down_bias.float().index_select(0, expert_S)).sum(dim=1)

    d_down = d_gate_up = dx_TH = d_gate_up_bias = d_down_bias = None
    if needs_d_down or down_bias is not None:
        dy_weighted_SH = dy_SH.mul_(w_S1)
        if needs_d_down:
            d_down = _per_expert_outer(dy_weighted_SH, h_SI, counts).to(down_proj.dtype)
        if down_bias is not None:
            d_down_bias = _per_expert_sum(dy_weighted_SH, counts).to(down_bias.dtype)
    if needs_d_gate_up:
        d_gate_up = _per_expert_outer(d_gate_up_S2I, x_SH, counts).to(gate_up_proj.dtype)
    if gate_up_bias is not None:
        d_gate_up_bias = _per_expert_sum(d_gate_up_S2I, counts).to(gate_up_bias.dtype)
    inverse_S = routing.inverse_order.long()
    if needs_dx:
        dx_SH = torch.empty_like(x_SH)
        _grouped_mm_into(d_gate_up_S2I, gate_up_proj.transpose(1, 2), dx_SH, counts)
        dx_TH = dx_SH.index_select(0, inverse_S).view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
    dw_TK = dw_S.index_select(0, inverse_S).view(num_tokens, top_k).to(routing.weights.dtype)
    return dx_TH, d_gate_up, d_down, dw_TK, d_gate_up_bias, d_down_bias
