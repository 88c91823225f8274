"""Pure-PyTorch expert FFN with its hand-written backward: the CPU path and the kernels' oracle.

Every activation of `activation.py` (gated and non-gated) and optional per-expert biases are
computed here; the Triton kernels fuse the same activations and biases, and are tested against
this file.

Shape legend: T tokens, H hidden, I expert width, E experts, K top_k, S = T·K slots. "Sorted"
rows are slots in `routing.sort_order` order (grouped by expert).
Weights use transformers' fused-experts layout: `gate_up_proj` `[E, 2I, H]` holds the gate rows,
then the up rows; `down_proj` `[E, H, I]`. With a non-gated activation ("relu2", ...) the first
weight is the up projection alone, `[E, I, H]`, and every "2I" below reads "I".

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
    gate_softcap: float | None = None,
    up_softcap: float | None = None,
) -> torch.Tensor:
    """`Σ_j w_tj · (down_e(act(gate_up_e x_t + b1_e)) + b2_e)` over each token's K experts, in fp32.

    Args:
        x: `[T, H]`.
        gate_up_proj: `[E, 2I, H]` (any strides: a transposed view is fine); the up projection
            `[E, I, H]` for a non-gated activation.
        down_proj: `[E, H, I]`.
        routing: the `Routing` of these T tokens.
        activation, limit, alpha, gate_up_interleaved, gate_softcap, up_softcap: the
            activation (`moe_ffn`).
        gate_up_bias: optional `[E, 2I]` (`[E, I]` non-gated), added to the gate/up GEMM output.
        down_bias: optional `[E, H]`, added to the down GEMM output (before the routing weight).

    Returns:
        `[T, H]` in `x.dtype`. Differentiable by autograd in x, the weights, the biases and
        `routing.weights`. Loops over experts with data-dependent slicing (a host sync).
    """
    act = GatedActivation(activation, limit, alpha, gate_up_interleaved, gate_softcap, up_softcap)
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
    saved: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_ffn_reference`, also returning the sorted gate/up pre-activations `[S, 2I]` (fp32,
    biases included; the `[S, I]` up pre-activations for a non-gated activation).

    `saved`, a dict, receives what `moe_ffn_reference_backward(saved=...)` would otherwise
    recompute (the sorted rows of x, `"x_SH"`, and under no_grad with plain SwiGLU the gate's
    SiLU, `"silu_SI"`): `MoeFfnCPU` keeps them, saving an `[S, H]` gather and an `[S, I]` SiLU
    per backward, ~5% of a forward + backward at the default's shapes on CPU."""
    num_tokens, hidden = x.shape
    top_k = routing.top_k
    inter = down_proj.shape[2]
    order_S = routing.sort_order.long()
    x_sorted_SH = x.float().index_select(0, order_S // top_k)
    if saved is not None:
        saved["x_SH"] = x_sorted_SH
    groups = _Groups(routing, x_sorted_SH, gate_up_proj, down_proj)
    if groups.empty:
        empty = x_sorted_SH.new_zeros(0, gate_up_proj.shape[1])
        return x.new_zeros(num_tokens, hidden), empty
    expert_S = (
        _expert_of_sorted_slot(routing, order_S)
        if gate_up_bias is not None or down_bias is not None
        else None
    )
    if torch.is_grad_enabled():  # autograd records slices and cat, not writes into a buffer
        gate_up_S2I = groups.linear(x_sorted_SH, gate_up_proj)
        if gate_up_bias is not None:
            gate_up_S2I = gate_up_S2I + gate_up_bias.float().index_select(0, expert_S)
        h_SI = activation.forward(gate_up_S2I)
        y_sorted_SH = groups.linear(h_SI, down_proj)
        if down_bias is not None:
            y_sorted_SH = y_sorted_SH + down_bias.float().index_select(0, expert_S)
    else:  # inside the custom op, or under no_grad (generation): no per-expert copies
        gate_up_S2I = groups.linear(x_sorted_SH, gate_up_proj)
        if gate_up_bias is not None:
            gate_up_S2I.add_(gate_up_bias.float().index_select(0, expert_S))
        if activation.is_plain_swiglu and saved is not None:
            silu_SI = saved["silu_SI"] = F.silu(gate_up_S2I[:, :inter])
            h_SI = silu_SI * gate_up_S2I[:, inter:]
        elif activation.is_plain_swiglu:
            h_SI = F.silu(gate_up_S2I[:, :inter]).mul_(gate_up_S2I[:, inter:])
        else:
            h_SI = activation.forward(gate_up_S2I)
        y_sorted_SH = groups.linear(h_SI, down_proj)
        if down_bias is not None:
            y_sorted_SH.add_(down_bias.float().index_select(0, expert_S))
    # Back to slot order, weight, and sum each token's K slots: deterministic, no atomics.
    y_SH = y_sorted_SH.index_select(0, routing.inverse_order.long())
    y_TKH = y_SH.view(num_tokens, top_k, hidden) * routing.weights.float().unsqueeze(-1)
    return y_TKH.sum(dim=1).to(x.dtype), gate_up_S2I


class _Groups:
    """The expert groups of the sorted slots, and the grouped GEMMs over them.

    On CPU, `torch._grouped_mm` runs every expert's GEMM in one call (no Python loop over experts,
    no host sync for the group sizes; differentiable by autograd), bit for bit the per-expert
    `mm`s. It needs 16-byte aligned strides and base pointers (fp32 H and I multiples of 4);
    otherwise, and off CPU, the GEMMs loop over experts with `torch.mm` views as before. At the
    default student's shapes (E = 8, a few hundred slots) the loop's Python costs as much as its
    GEMMs, and at E = 32 several times more.
    """

    def __init__(self, routing: Routing, a_SK: torch.Tensor, *weights_E: torch.Tensor):
        self.routing, self.ends_E, self._counts = routing, None, None
        if _grouped_mm_fits(a_SK, *weights_E):
            self.ends_E = routing.expert_offsets[1:].to(torch.int32)
            self.empty = a_SK.shape[0] == 0
        else:
            self.empty = not any(self.counts)

    @property
    def counts(self) -> list[int]:
        """Slots per expert, on the host (a sync on GPU)."""
        if self._counts is None:
            self._counts = self.routing.tokens_per_expert.tolist()
        return self._counts

    def linear(self, a_SK: torch.Tensor, w_ENK: torch.Tensor) -> torch.Tensor:
        """`a[rows of e] @ w[e].T` for each expert's block of sorted rows, `[S, N]` fp32."""
        if self.ends_E is not None:
            return torch._grouped_mm(a_SK, w_ENK.float().transpose(1, 2), offs=self.ends_E)
        if torch.is_grad_enabled():
            return _grouped_linear(a_SK, w_ENK, self.counts)
        out_SN = a_SK.new_empty(a_SK.shape[0], w_ENK.shape[1])
        _grouped_mm_into(a_SK, w_ENK, out_SN, self.counts)
        return out_SN

    def outer(self, a_SN: torch.Tensor, b_SK: torch.Tensor) -> torch.Tensor:
        """`out[e] = a[rows of e].T @ b[rows of e]`, `[E, N, K]` fp32 (zero for an empty expert)."""
        if self.ends_E is not None:
            return torch._grouped_mm(a_SN.t(), b_SK, offs=self.ends_E)
        return _per_expert_outer(a_SN, b_SK, self.counts)


_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _grouped_mm_fits(a_SK: torch.Tensor, *weights_E: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these GEMMs: CPU tensors, H and I multiples of 4 (the
    fp32 operands' strides are then 16-byte multiples, as it requires) and weights whose
    strides and base pointers are 16-byte aligned (a transposed view is fine). Not under a
    dispatch mode: FlopCounterMode has no formula for `_grouped_mm` (it counts the `mm`s)."""
    if not _HAS_GROUPED_MM or a_SK.device.type != "cpu" or a_SK.shape[1] % 4:
        return False
    if torch._C._len_torch_dispatch_stack():
        return False
    for w in weights_E:
        if w.shape[1] % 4 or w.shape[2] % 4 or w.data_ptr() % 16:
            return False
        if any(size > 1 and stride != 1 and (stride * w.element_size()) % 16 for size, stride in
               zip(w.shape, w.stride(), strict=True)):  # fmt: skip
            return False
    return True


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
    saved: dict | None = None,
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
        saved: what `moe_ffn_reference_forward(saved=...)` kept (read only), or None.

    Returns:
        `(dx [T, H], d gate_up_proj [E, 2I, H], d down_proj [E, H, I], d weights [T, K],
        d gate_up_bias [E, 2I] or None, d down_bias [E, H] or None)`, each in its input's dtype.
    """
    needs_dx, needs_d_gate_up, needs_d_down = needs
    num_tokens, hidden = x.shape
    top_k, inter = routing.top_k, down_proj.shape[2]
    order_S = routing.sort_order.long()
    tokens_S = order_S // top_k
    saved = saved or {}
    x_SH = saved.get("x_SH")
    if x_SH is None:
        x_SH = x.float().index_select(0, tokens_S)
    dy_SH = grad.float().index_select(0, tokens_S)
    w_S1 = routing.weights.float().reshape(-1).index_select(0, order_S).unsqueeze(1)
    groups = _Groups(routing, x_SH, gate_up_proj, down_proj)
    has_bias = gate_up_bias is not None or down_bias is not None
    expert_S = _expert_of_sorted_slot(routing, order_S) if has_bias else None
    if gate_up_S2I is None or gate_up_S2I.shape[0] != x_SH.shape[0]:
        gate_up_S2I = groups.linear(x_SH, gate_up_proj)
        if gate_up_bias is not None:
            gate_up_S2I.add_(gate_up_bias.float().index_select(0, expert_S))

    dh_unweighted_SI = groups.linear(dy_SH, down_proj.transpose(1, 2))
    if activation.is_plain_swiglu:
        gate_SI, up_SI = gate_up_S2I[:, :inter], gate_up_S2I[:, inter:]
        silu_SI = saved.get("silu_SI")
        if silu_SI is None or silu_SI.shape != gate_SI.shape:
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
            d_down = groups.outer(dy_weighted_SH, h_SI).to(down_proj.dtype)
        if down_bias is not None:
            d_down_bias = _per_expert_sum(dy_weighted_SH, groups.counts).to(down_bias.dtype)
    if needs_d_gate_up:
        d_gate_up = groups.outer(d_gate_up_S2I, x_SH).to(gate_up_proj.dtype)
    if gate_up_bias is not None:
        d_gate_up_bias = _per_expert_sum(d_gate_up_S2I, groups.counts).to(gate_up_bias.dtype)
    inverse_S = routing.inverse_order.long()
    if needs_dx:
        dx_SH = groups.linear(d_gate_up_S2I, gate_up_proj.transpose(1, 2))
        dx_TH = dx_SH.index_select(0, inverse_S).view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
    dw_TK = dw_S.index_select(0, inverse_S).view(num_tokens, top_k).to(routing.weights.dtype)
    return dx_TH, d_gate_up, d_down, dw_TK, d_gate_up_bias, d_down_bias
