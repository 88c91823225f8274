"""Triton grouped expert GEMMs (scatter-to-scatter): forward and backward of the SwiGLU experts
(and of every other activation of activation.py, gated or not: a constexpr picks the epilogue),
with optional per-expert biases (GPT-OSS, Aria).

Shape legend: T tokens, H hidden, I expert width, E experts, K top_k, S = T·K slots. "Sorted"
rows are slots in `sort_order_S` order (grouped by expert); slot `s` belongs to token `s // K`.

Forward (two GEMM launches and a combine; no padded copy of x, no per-expert Python loop, no
host sync):
1. `_gate_up_swiglu_kernel`: gathers x rows by token inside its loads, computes the gate and up
   tiles against `gate_up_proj[e]`, adds the gate/up bias `b1[e]` (same row layout as the weight,
   interleaved or not) in the epilogue, and writes `h = act(gate, up)` in sorted order, `[S, I]`.
2. `_scatter_down_kernel`: `h @ down_proj[e].T + b2[e]`, times the slot's routing weight (the
   bias is part of the expert output the weight scales, as in transformers' GptOssExperts),
   stored at the slot's row of `[S, H]`; `_combine_slots_kernel` sums each token's K rows in slot
   order in fp32 (deterministic, no atomics).

Backward (five launches, and one more per bias) recomputes gate/up (bias included) instead of
saving the `[S, 2I]` intermediate: the forward saves nothing beyond its inputs, which is the
memory that matters when many MoE layers keep activations for backward. The recompute costs one
extra `S·H·2I` GEMM, fused into the kernel that needs it (`_swiglu_backward_kernel`), which also
yields the routing-weight gradient. The bias gradients are per-expert sums over each expert's
sorted rows (`_expert_bias_grad_kernel`, one program per column tile and expert, rows summed in
order: no atomics): of d(gate|up) for b1, of `w · dy` for b2; the latter launch also gives the
down bias's share of the routing-weight gradient, `dy · b2[e]`.

Every tile maps to its expert on the device (`_expert_tile`) from `expert_offsets_E1`; the grid
is sized for the worst case (`cdiv(S, BLOCK_M) + E` row tiles) and surplus tiles exit at once,
so empty experts and any load imbalance need no host round trip. Row indices are int64 before
they meet a stride, so `T·K·H > 2**31` does not overflow.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import interpreter_enabled
from .activation import GatedActivation

SWIGLU = GatedActivation()

__all__ = ["moe_ffn_triton_backward", "moe_ffn_triton_forward"]


# The backward kernel writes one routing-weight partial per I-tile: a fixed BLOCK_N keeps the
# partials buffer's shape independent of the autotuner's choice.
_BWD_BLOCK_N = 32 if interpreter_enabled() else 64

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for H100-class GPUs, per accumulator count:
# the gate/up kernel holds two [BLOCK_M, BLOCK_N] fp32 accumulators, the backward kernel three.
_GPU_TILES = {
    "single": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
               (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)],
    "dual": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
             (64, 64, 64, 4, 3)],
    "triple": [(128, _BWD_BLOCK_N, 64, 8, 3), (128, _BWD_BLOCK_N, 32, 8, 4), (64, _BWD_BLOCK_N, 64, 4, 4),
               (64, _BWD_BLOCK_N, 64, 4, 3)],
}  # fmt: skip


def _configs(kind: str) -> list[triton.Config]:
    """A small search space per kernel kind; one cheap config in the CPU interpreter."""
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in _GPU_TILES[kind]
    ]


def _prune_to_problem(block_extents: dict[str, str]):
    """`early_config_prune` that drops tiles larger than the problem: a config whose block
    (`BLOCK_M`, `BLOCK_N` or `BLOCK_K`) exceeds its extent (the kernel argument named beside it,
    rounded up to a power of two, at least 64) only adds masked work. Decode batches and small test
    shapes then compile and time one or two configs instead of every one; shapes whose extents
    all reach the largest tile (the prefill and training shapes in benchmarks/results) keep the
    full list."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        limit = {b: max(64, triton.next_power_of_2(int(args[a]))) for b, a in block_extents.items()}
        kept = [c for c in configs if all(c.kwargs[b] <= limit[b] for b in block_extents)]
        # Never empty: with no config within bounds, the one with the smallest tiles.
        return kept or [min(configs, key=lambda c: [c.kwargs[b] for b in block_extents])]

    return prune


# `GatedActivation.name` -> the ACTIVATION code of the kernels' epilogues; codes from
# `_FIRST_UNGATED` on have no gate (one accumulator, the first weight is `[E, I, H]`).
_ACTIVATION_CODES = {
    "swiglu": 0,
    "swiglu_limit": 1,
    "swiglu_limit_post": 2,
    "gpt_oss": 3,
    "swiglu_softcap": 4,
    "relu2": 5,
    "relu": 6,
    "silu": 7,
    "gelu": 8,
}
_FIRST_UNGATED = 5
# "No clamp" as a finite fp32 bound (a kernel argument cannot be None).
_NO_LIMIT = 3.0e38


def _activation_args(activation) -> dict:
    """Kernel arguments of a `GatedActivation`: its code, bound, α and gate/up row layout.

    `"swiglu_softcap"` has no bound or α: its two runtime parameters carry the soft caps
    instead, `LIMIT` = c_g (`gate_softcap`) and `ALPHA` = c_u (`up_softcap`)."""
    assert (_ACTIVATION_CODES[activation.name] < _FIRST_UNGATED) == activation.gated
    if activation.name == "swiglu_softcap":
        first, second = float(activation.gate_softcap), float(activation.up_softcap)
    else:
        first = _NO_LIMIT if activation.limit is None else float(activation.limit)
        second = 1.0 if activation.alpha is None else float(activation.alpha)
    return {
        "ACTIVATION": _ACTIVATION_CODES[activation.name],
        "LIMIT": first,
        "ALPHA": second,
        "GATE_STEP": 2 if activation.interleaved else 1,
        "GATED": activation.gated,
    }


@triton.jit
def _ungated_forward(u, ACTIVATION: tl.constexpr):
    """h of the non-gated activations (activation.py) on an fp32 up tile."""
    if ACTIVATION == 5:
        r = tl.maximum(u, 0.0)
        h = r * r
    elif ACTIVATION == 6:
        h = tl.maximum(u, 0.0)
    elif ACTIVATION == 7:
        h = u * tl.sigmoid(u)
    else:
        h = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))  # u · Φ(u), Φ via erf(u/√2)
    return h


@triton.jit
def _ungated_backward(dh, u, ACTIVATION: tl.constexpr):
    """`(h, d up)` of `_ungated_forward`; the ReLUs pass no gradient at 0, as torch's do."""
    if ACTIVATION == 5:
        r = tl.maximum(u, 0.0)
        h = r * r
        d_up = dh * 2.0 * r
    elif ACTIVATION == 6:
        h = tl.maximum(u, 0.0)
        d_up = tl.where(u > 0.0, dh, 0.0)
    elif ACTIVATION == 7:
        sig = tl.sigmoid(u)
        h = u * sig
        d_up = dh * sig * (1.0 + u * (1.0 - sig))
    else:
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        h = u * cdf
        d_up = dh * (cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u))  # Φ(u) + u·φ(u)
    return h, d_up


@triton.jit
def _tanh_parts(x):
    """`(tanh(x), 1 - tanh(x)²)` from `e = exp(-2|x|)` in (0, 1] (never overflows):
    `tanh |x| = (1 - e) / (1 + e)`, `1 - tanh² = 4e / (1 + e)²` (no cancellation near ±1)."""
    e = tl.exp(-2.0 * tl.abs(x))
    inv = 1.0 / (1.0 + e)
    t = (1.0 - e) * inv
    return tl.where(x < 0.0, -t, t), 4.0 * e * inv * inv


@triton.jit
def _gated_forward(g, u, ACTIVATION: tl.constexpr, LIMIT, ALPHA):
    """h of the five gated activations (activation.py) on fp32 gate/up tiles; for
    "swiglu_softcap" (4) `LIMIT` is the gate cap c_g and `ALPHA` the up cap c_u."""
    u_c = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
    if ACTIVATION == 0:
        h = g * tl.sigmoid(g) * u
    elif ACTIVATION == 1:
        g_c = tl.minimum(g, LIMIT)
        h = g_c * tl.sigmoid(g_c) * u_c
    elif ACTIVATION == 2:
        h = tl.minimum(g * tl.sigmoid(g), LIMIT) * u_c
    elif ACTIVATION == 3:
        g_c = tl.minimum(g, LIMIT)
        h = (u_c + 1.0) * (g_c * tl.sigmoid(g_c * ALPHA))
    else:
        t_g, _ = _tanh_parts(g / LIMIT)
        t_u, _ = _tanh_parts(u / ALPHA)
        h = (LIMIT * t_g) * tl.sigmoid(g) * (ALPHA * t_u)
    return h


@triton.jit
def _gated_backward(dh, g, u, ACTIVATION: tl.constexpr, LIMIT, ALPHA):
    """`(h, d gate, d up)`; clamp masks inclusive of the bounds, as torch.clamp's gradient.
    For "swiglu_softcap" (4) `LIMIT` is c_g and `ALPHA` c_u, as in `_gated_forward`."""
    u_c = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
    u_in = (u >= -LIMIT) & (u <= LIMIT)
    if ACTIVATION == 0:
        sig = tl.sigmoid(g)
        act = g * sig
        h = act * u
        d_gate = dh * u * sig * (1.0 + g * (1.0 - sig))
        d_up = dh * act
    elif ACTIVATION == 1:
        g_c = tl.minimum(g, LIMIT)
        sig = tl.sigmoid(g_c)
        act = g_c * sig
        h = act * u_c
        d_gate = tl.where(g <= LIMIT, dh * u_c * sig * (1.0 + g_c * (1.0 - sig)), 0.0)
        d_up = tl.where(u_in, dh * act, 0.0)
    elif ACTIVATION == 2:
        sig = tl.sigmoid(g)
        silu = g * sig
        act = tl.minimum(silu, LIMIT)
        h = act * u_c
        d_gate = tl.where(silu <= LIMIT, dh * u_c * sig * (1.0 + g * (1.0 - sig)), 0.0)
        d_up = tl.where(u_in, dh * act, 0.0)
    elif ACTIVATION == 3:
        g_c = tl.minimum(g, LIMIT)
        sig = tl.sigmoid(g_c * ALPHA)
        glu = g_c * sig
        h = (u_c + 1.0) * glu
        d_gate = tl.where(g <= LIMIT, dh * (u_c + 1.0) * (sig + ALPHA * glu * (1.0 - sig)), 0.0)
        d_up = tl.where(u_in, dh * glu, 0.0)
    else:
        t_g, sech2_g = _tanh_parts(g / LIMIT)
        t_u, sech2_u = _tanh_parts(u / ALPHA)
        sig = tl.sigmoid(g)
        capped_g = LIMIT * t_g
        capped_u = ALPHA * t_u
        act = capped_g * sig
        h = act * capped_u
        d_gate = dh * capped_u * (sech2_g * sig + act * (1.0 - sig))
        d_up = dh * act * sech2_u
    return h, d_gate, d_up


@triton.jit
def _add_gate_up_bias(
    acc_g,
    acc_u,
    b13_ptr,
    expert,
    cols,
    col_mask,
    stride_be,
    stride_bn,
    UP_OFFSET,
    GATE_STEP: tl.constexpr,
    GATED: tl.constexpr,
):
    """The gate/up GEMM epilogue's bias: `b13[e]` in the weight's row layout (gate column n at
    `n·GATE_STEP`, its up column `UP_OFFSET` further), added in fp32 before the activation."""
    b_ptrs = b13_ptr + expert.to(tl.int64) * stride_be + (cols * GATE_STEP).to(tl.int64) * stride_bn
    acc_g += tl.load(b_ptrs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc_u += tl.load(b_ptrs + UP_OFFSET * stride_bn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc_g, acc_u


@triton.jit
def _expert_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map row-tile `pid_m` to (expert, first sorted row, end row of that expert); expert == E: idle."""
    e_idx = tl.arange(0, BLOCK_E)
    valid = e_idx < E
    lo = tl.load(offsets_ptr + e_idx, mask=valid, other=0)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=valid, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    sel = e_idx == expert
    tile_begin = tl.sum(tl.where(sel, tiles_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(sel, lo, 0), 0) + (pid_m - tile_begin) * BLOCK_M
    row_end = tl.sum(tl.where(sel, hi, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _split_pid(n_cols, BLOCK_N: tl.constexpr):
    """1-D launch, column tiles fastest: consecutive programs reuse one gathered row tile and one
    expert's weights from L2 (and the grid never meets the 65535 limit of the other axes)."""
    n_tiles = tl.cdiv(n_cols, BLOCK_N)
    pid = tl.program_id(0)
    return pid // n_tiles, pid % n_tiles


@triton.autotune(
    configs=_configs("dual"),
    key=["H", "I", "ROWS_BUCKET"],
    prune_configs_by={
        "early_config_prune": _prune_to_problem({"BLOCK_M": "ROWS_BUCKET", "BLOCK_N": "I", "BLOCK_K": "H"})
    },
)
@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr,
    w13_ptr,
    b13_ptr,
    h_ptr,
    order_ptr,
    offsets_ptr,
    E,
    H,
    I,
    ROWS_BUCKET,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wh,
    stride_be,
    stride_bn,
    stride_hs,
    LIMIT,
    ALPHA,
    UP_OFFSET,
    TOP_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATE_STEP: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """h[p, n] = act(x[t_p] · Wg[e, n] + bg[e, n], x[t_p] · Wu[e, n] + bu[e, n]) for sorted rows
    p of expert e (the bias terms only with `HAS_BIAS`).

    Gate row n of expert e is row `n·GATE_STEP` of `gate_up_proj[e]`, its up row `UP_OFFSET`
    further: (1, I) for the gate half then the up half, (2, 1) for interleaved rows; the bias
    `[E, 2I]` is laid out the same way. Without a gate (`GATED` False) the first weight is the up
    projection `[E, I, H]` (bias `[E, I]`): its rows take the "gate" pointers, one accumulator,
    and h[p, n] = act(x[t_p] · Wu[e, n] + bu[e, n]).
    """
    pid_m, pid_n = _split_pid(I, BLOCK_N)
    expert, row_start, row_end = _expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(order_ptr + rows, mask=row_mask, other=0)
    tokens = (slots // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh
    wg_ptrs = (
        w13_ptr
        + expert.to(tl.int64) * stride_we
        + (cols[None, :] * GATE_STEP).to(tl.int64) * stride_wn
        + ks[:, None] * stride_wh
    )
    wu_ptrs = wg_ptrs + UP_OFFSET * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = ks < H - k0
        xa = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        acc_g = tl.dot(xa, wg, acc_g, input_precision=DOT_PRECISION)
        if GATED:
            wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
            acc_u = tl.dot(xa, wu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        wg_ptrs += BLOCK_K * stride_wh
        wu_ptrs += BLOCK_K * stride_wh
    if HAS_BIAS:
        acc_g, acc_u = _add_gate_up_bias(
            acc_g, acc_u, b13_ptr, expert, cols, col_mask, stride_be, stride_bn, UP_OFFSET, GATE_STEP, GATED
        )
    if GATED:
        h = _gated_forward(acc_g, acc_u, ACTIVATION, LIMIT, ALPHA)
    else:
        h = _ungated_forward(acc_g, ACTIVATION)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hs + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(
    configs=_configs("single"),
    key=["N", "K_DIM", "ROWS_BUCKET"],
    prune_configs_by={
        "early_config_prune": _prune_to_problem(
            {"BLOCK_M": "ROWS_BUCKET", "BLOCK_N": "N", "BLOCK_K": "K_DIM"}
        )
    },
)
@triton.jit
def _scatter_down_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    order_ptr,
    offsets_ptr,
    scale_ptr,
    bias_ptr,
    E,
    N,
    K_DIM,
    ROWS_BUCKET,
    stride_as,
    stride_be,
    stride_bk,
    stride_bn,
    stride_os,
    stride_biase,
    stride_biasn,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[slot_p, n] = scale[slot_p] · (Σ_k a[p, k] · b[e, k, n] + bias[e, n]) for sorted rows p
    of expert e (the bias only with `HAS_BIAS`, the scale only with `HAS_SCALE`).

    Forward down GEMM (a = h, b = down_proj viewed [E, I, H], bias = down_proj's `[E, H]`, added
    before the routing weight scales the expert's output, scale = routing weights) and the
    backward dx GEMM (a = d(gate|up), b = gate_up_proj [E, 2I, H], no bias, no scale) share it.
    """
    pid_m, pid_n = _split_pid(N, BLOCK_N)
    expert, row_start, row_end = _expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_as + ks[None, :]
    b_ptrs = (
        b_ptr
        + expert.to(tl.int64) * stride_be
        + ks[:, None].to(tl.int64) * stride_bk
        + cols[None, :] * stride_bn
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        k_mask = ks < K_DIM - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        bias_ptrs = bias_ptr + expert.to(tl.int64) * stride_biase + cols * stride_biasn
        acc += tl.load(bias_ptrs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    slots = tl.load(order_ptr + rows, mask=row_mask, other=0)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_os + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(
    configs=_configs("triple"),
    key=["H", "I", "ROWS_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_to_problem({"BLOCK_M": "ROWS_BUCKET", "BLOCK_K": "H"})},
)
@triton.jit
def _swiglu_backward_kernel(
    x_ptr,
    dy_ptr,
    w13_ptr,
    b13_ptr,
    w2_ptr,
    weight_ptr,
    order_ptr,
    offsets_ptr,
    dgu_ptr,
    hw_ptr,
    dweight_part_ptr,
    E,
    H,
    I,
    S,
    ROWS_BUCKET,
    stride_xt,
    stride_xh,
    stride_dt,
    stride_dh,
    stride_we,
    stride_wn,
    stride_wh,
    stride_de,
    stride_dh2,
    stride_di,
    stride_be,
    stride_bn,
    stride_gs,
    stride_hs,
    LIMIT,
    ALPHA,
    UP_OFFSET,
    TOP_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATE_STEP: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Recompute gate/up (with its bias under `HAS_BIAS`), push dy back through down and the
    activation for sorted rows p of expert e (gate/up rows as in `_gate_up_swiglu_kernel`;
    without a gate, d up `[S, I]` alone).

    Writes d(gate|up) `[S, 2I]` (in gate_up_proj's row layout) and w·h `[S, I]` in sorted order,
    and the routing-weight gradient partial `Σ_n (dy[t_p] · W2[e, :, n]) · h[p, n]` for this
    I-tile at `[pid_n, slot_p]` (the down bias's share, `dy[t_p] · b2[e]`, comes from
    `_expert_bias_grad_kernel`).
    """
    pid_m, pid_n = _split_pid(I, BLOCK_N)
    expert, row_start, row_end = _expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(order_ptr + rows, mask=row_mask, other=0)
    tokens = (slots // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh
    dy_ptrs = dy_ptr + tokens[:, None] * stride_dt + ks[None, :] * stride_dh
    wg_ptrs = (
        w13_ptr
        + expert.to(tl.int64) * stride_we
        + (cols[None, :] * GATE_STEP).to(tl.int64) * stride_wn
        + ks[:, None] * stride_wh
    )
    wu_ptrs = wg_ptrs + UP_OFFSET * stride_wn
    w2_ptrs = (
        w2_ptr
        + expert.to(tl.int64) * stride_de
        + ks[:, None].to(tl.int64) * stride_dh2
        + cols[None, :] * stride_di
    )
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = ks < H - k0
        a_mask = row_mask[:, None] & k_mask[None, :]
        w_mask = k_mask[:, None] & col_mask[None, :]
        xa = tl.load(x_ptrs, mask=a_mask, other=0.0)
        da = tl.load(dy_ptrs, mask=a_mask, other=0.0)
        acc_g = tl.dot(xa, tl.load(wg_ptrs, mask=w_mask, other=0.0), acc_g, input_precision=DOT_PRECISION)
        if GATED:
            wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
            acc_u = tl.dot(xa, wu, acc_u, input_precision=DOT_PRECISION)
        acc_d = tl.dot(da, tl.load(w2_ptrs, mask=w_mask, other=0.0), acc_d, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        dy_ptrs += BLOCK_K * stride_dh
        wg_ptrs += BLOCK_K * stride_wh
        wu_ptrs += BLOCK_K * stride_wh
        w2_ptrs += BLOCK_K * stride_dh2
    if HAS_BIAS:
        acc_g, acc_u = _add_gate_up_bias(
            acc_g, acc_u, b13_ptr, expert, cols, col_mask, stride_be, stride_bn, UP_OFFSET, GATE_STEP, GATED
        )
    weight = tl.load(weight_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    dh = acc_d * weight[:, None]
    if GATED:
        h, d_gate, d_up = _gated_backward(dh, acc_g, acc_u, ACTIVATION, LIMIT, ALPHA)
    else:
        h, d_gate = _ungated_backward(dh, acc_g, ACTIVATION)  # d of the up projection
        d_up = d_gate
    tl.store(dweight_part_ptr + pid_n.to(tl.int64) * S + slots, tl.sum(acc_d * h, axis=1), mask=row_mask)
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows[:, None].to(tl.int64)
    dgu_ptrs = dgu_ptr + rows64 * stride_gs + cols[None, :] * GATE_STEP
    tl.store(dgu_ptrs, d_gate.to(dgu_ptr.dtype.element_ty), mask=mask)
    if GATED:
        tl.store(dgu_ptrs + UP_OFFSET, d_up.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(
        hw_ptr + rows64 * stride_hs + cols[None, :],
        (h * weight[:, None]).to(hw_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.autotune(
    configs=_configs("single"),
    key=["M", "N", "ROWS_BUCKET"],
    prune_configs_by={
        "early_config_prune": _prune_to_problem({"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "ROWS_BUCKET"})
    },
)
@triton.jit
def _expert_weight_grad_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    order_ptr,
    offsets_ptr,
    M,
    N,
    ROWS_BUCKET,
    stride_ar,
    stride_ac,
    stride_br,
    stride_bc,
    stride_oe,
    stride_om,
    stride_on,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    TOP_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[e, m, n] = Σ_{p of expert e} A[row_a(p), m] · B[row_b(p), n].

    A gathered row is the token of sorted row p (`sort_order_S[p] // K`), else p itself. Each
    program owns one output tile and reduces over its expert's rows in order: no atomics, and an
    empty expert writes zeros.
    """
    expert = tl.program_id(2)
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_K):
        ps = p0 + tl.arange(0, BLOCK_K)
        p_mask = ps < hi
        tokens = (tl.load(order_ptr + ps, mask=p_mask, other=0) // TOP_K).to(tl.int64)
        rows_a = tokens if GATHER_A else ps.to(tl.int64)
        rows_b = tokens if GATHER_B else ps.to(tl.int64)
        a = tl.load(
            a_ptr + rows_a[None, :] * stride_ar + ms[:, None] * stride_ac,
            mask=m_mask[:, None] & p_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rows_b[:, None] * stride_br + ns[None, :] * stride_bc,
            mask=p_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    out_ptrs = (
        out_ptr
        + expert.to(tl.int64) * stride_oe
        + ms[:, None].to(tl.int64) * stride_om
        + ns[None, :] * stride_on
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _expert_bias_grad_kernel(
    a_ptr,
    scale_ptr,
    vec_ptr,
    order_ptr,
    offsets_ptr,
    out_ptr,
    dot_part_ptr,
    N,
    S,
    stride_ar,
    stride_ac,
    stride_ve,
    stride_vn,
    stride_oe,
    stride_on,
    GATHER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_DOT: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[e, n] = Σ_{p of expert e} scale[slot_p] · A[row(p), n]: a bias gradient, the per-expert
    sum over its sorted rows (the scale only with `HAS_SCALE`).

    A gathered row (`GATHER`) is the token of sorted row p, else p itself. Each program owns the
    columns of one N-tile of one expert and sums the expert's rows in order, BLOCK_P at a time
    in fp32: no atomics, and an empty expert writes zeros. With `HAS_DOT` it also writes, per
    row, `dot_part[pid_n, slot_p] = Σ_{n in the tile} A[row(p), n] · vec[e, n]` (unscaled): for
    the down bias (A = dy, vec = b2) that is the bias's share of the routing-weight gradient.
    """
    pid_n = tl.program_id(0)
    expert = tl.program_id(1)
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_DOT:
        vec = tl.load(
            vec_ptr + expert.to(tl.int64) * stride_ve + cols * stride_vn, mask=col_mask, other=0.0
        ).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_mask = ps < hi
        slots = tl.load(order_ptr + ps, mask=p_mask, other=0)
        if GATHER:
            rows = (slots // TOP_K).to(tl.int64)
        else:
            rows = ps.to(tl.int64)
        a = tl.load(
            a_ptr + rows[:, None] * stride_ar + cols[None, :] * stride_ac,
            mask=p_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_DOT:
            dot = tl.sum(a * vec[None, :], axis=1)
            tl.store(dot_part_ptr + pid_n.to(tl.int64) * S + slots, dot, mask=p_mask)
        if HAS_SCALE:
            a = a * tl.load(scale_ptr + slots, mask=p_mask, other=0.0).to(tl.float32)[:, None]
        acc += tl.sum(a, axis=0)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + cols * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def _empty(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Every buffer the kernels fill (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(*shape, device=device, dtype=dtype)


@triton.jit
def _combine_slots_kernel(y_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = Σ_j y[t·K + j] in slot order with fp32 accumulation: deterministic, no atomics."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (token * TOP_K + j) * H + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul setting (exact by default); 16-bit inputs take the default path.
    exact = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return "ieee" if exact else "tf32"


def _block_e(num_experts: int) -> int:
    return max(2, triton.next_power_of_2(num_experts))


def _rows_bucket(num_slots: int, num_experts: int) -> int:
    """Autotuning key: mean rows per expert, rounded to a power of two (tiles differ by load)."""
    return triton.next_power_of_2(max(1, num_slots // num_experts))


def _row_tiles(num_slots: int, num_experts: int):
    """Worst-case row-tile count: every expert may end in a partial tile."""
    return lambda meta: triton.cdiv(num_slots, meta["BLOCK_M"]) + num_experts


def _sum_slots(y_SH: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """`[T, H]`: each token's K slot rows of the contiguous `[S, H]` summed in slot order."""
    if top_k == 1:
        return y_SH
    hidden = y_SH.shape[1]
    out_TH = _empty(num_tokens, hidden, device=y_SH.device, dtype=y_SH.dtype)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _combine_slots_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y_SH, out_TH, hidden, TOP_K=top_k, BLOCK_H=block_h, num_warps=4
    )
    return out_TH


def _bias_args(bias: torch.Tensor | None, like: torch.Tensor) -> tuple:
    """`(pointer, stride 0, stride 1)` of an optional `[E, N]` bias; any tensor stands in for an
    absent one (its kernel's `HAS_BIAS` is False, so it is never read)."""
    return (bias, *bias.stride()) if bias is not None else (like, 0, 0)


def _gate_up_swiglu(x_TH, w13_E2IH, order_S, offsets_E1, top_k, activation, b13_E2I=None) -> torch.Tensor:
    """h in sorted order, `[S, I]` in x's dtype (w13 is `[E, I, H]` for a non-gated activation;
    the optional bias `[E, 2I]`, `[E, I]` non-gated, in w13's row layout)."""
    num_experts, two_inter, hidden = w13_E2IH.shape
    inter = two_inter // 2 if activation.gated else two_inter
    num_slots = order_S.numel()
    h_SI = _empty(num_slots, inter, device=x_TH.device, dtype=x_TH.dtype)
    rows = _row_tiles(num_slots, num_experts)
    b13, *b13_strides = _bias_args(b13_E2I, x_TH)
    _gate_up_swiglu_kernel[lambda m: (rows(m) * triton.cdiv(inter, m["BLOCK_N"]),)](
        x_TH,
        w13_E2IH,
        b13,
        h_SI,
        order_S,
        offsets_E1,
        num_experts,
        hidden,
        inter,
        _rows_bucket(num_slots, num_experts),
        x_TH.stride(0),
        x_TH.stride(1),
        *w13_E2IH.stride(),
        *b13_strides,
        h_SI.stride(0),
        UP_OFFSET=1 if activation.interleaved else inter,
        TOP_K=top_k,
        HAS_BIAS=b13_E2I is not None,
        BLOCK_E=_block_e(num_experts),
        DOT_PRECISION=_dot_precision(x_TH.dtype),
        **_activation_args(activation),
    )
    return h_SI


def _scatter_grouped_mm(a_SK, b_EKN, order_S, offsets_E1, scale_S, out_dtype, bias_EN=None) -> torch.Tensor:
    """Rows of `a_SK @ b_EKN[e] (+ bias_EN[e])` (sorted) stored at their slot's row of `[S, N]`,
    optionally scaled (after the bias)."""
    num_experts, k_dim, n_dim = b_EKN.shape
    num_slots = order_S.numel()
    out_SN = _empty(num_slots, n_dim, device=a_SK.device, dtype=out_dtype)
    rows = _row_tiles(num_slots, num_experts)
    bias, *bias_strides = _bias_args(bias_EN, a_SK)
    _scatter_down_kernel[lambda m: (rows(m) * triton.cdiv(n_dim, m["BLOCK_N"]),)](
        a_SK,
        b_EKN,
        out_SN,
        order_S,
        offsets_E1,
        scale_S if scale_S is not None else a_SK,
        bias,
        num_experts,
        n_dim,
        k_dim,
        _rows_bucket(num_slots, num_experts),
        a_SK.stride(0),
        *b_EKN.stride(),
        out_SN.stride(0),
        *bias_strides,
        HAS_SCALE=scale_S is not None,
        HAS_BIAS=bias_EN is not None,
        BLOCK_E=_block_e(num_experts),
        DOT_PRECISION=_dot_precision(a_SK.dtype),
    )
    return out_SN


def _expert_weight_grad(a, b, order_S, offsets_E1, top_k, *, gather_a, gather_b, out_dtype) -> torch.Tensor:
    """`[E, M, N]` with out[e] = A_e^T B_e over expert e's rows (see `_expert_weight_grad_kernel`)."""
    num_experts = offsets_E1.numel() - 1
    m_dim, n_dim = a.shape[1], b.shape[1]
    out_EMN = _empty(num_experts, m_dim, n_dim, device=a.device, dtype=out_dtype)
    grid = lambda m: (triton.cdiv(m_dim, m["BLOCK_M"]), triton.cdiv(n_dim, m["BLOCK_N"]), num_experts)
    _expert_weight_grad_kernel[grid](
        a,
        b,
        out_EMN,
        order_S,
        offsets_E1,
        m_dim,
        n_dim,
        _rows_bucket(order_S.numel(), num_experts),
        *a.stride(),
        *b.stride(),
        *out_EMN.stride(),
        GATHER_A=gather_a,
        GATHER_B=gather_b,
        TOP_K=top_k,
        DOT_PRECISION=_dot_precision(a.dtype),
    )
    return out_EMN


# `_expert_bias_grad_kernel`'s tiles: fixed, so the routing-weight partials' shape is known.
_BIAS_BLOCK_P = 32
_BIAS_BLOCK_N = 32 if interpreter_enabled() else 128


def _expert_bias_grad(a, order_S, offsets_E1, top_k, *, gather, out_dtype, scale_S=None, dot_EN=None):
    """`(out [E, N], dot [S] fp32 or None)`: out[e] = Σ over expert e's sorted rows of
    `scale · A[row]` (a bias gradient), and with `dot_EN` each row's `A[row] · dot_EN[e]` in slot
    order (see `_expert_bias_grad_kernel`)."""
    num_experts, num_slots, n_dim = offsets_E1.numel() - 1, order_S.numel(), a.shape[1]
    out_EN = _empty(num_experts, n_dim, device=a.device, dtype=out_dtype)
    n_tiles = triton.cdiv(n_dim, _BIAS_BLOCK_N)
    dot_part_NS = (
        _empty(n_tiles, num_slots, device=a.device, dtype=torch.float32) if dot_EN is not None else a
    )
    vec, *vec_strides = _bias_args(dot_EN, a)
    _expert_bias_grad_kernel[(n_tiles, num_experts)](
        a, scale_S if scale_S is not None else a, vec, order_S, offsets_E1, out_EN, dot_part_NS,
        n_dim, num_slots, *a.stride(), *vec_strides, *out_EN.stride(),
        GATHER=gather, HAS_SCALE=scale_S is not None, HAS_DOT=dot_EN is not None, TOP_K=top_k,
        BLOCK_P=_BIAS_BLOCK_P, BLOCK_N=_BIAS_BLOCK_N, num_warps=4,
    )  # fmt: skip
    # Fixed-order sum of the per-tile partials: deterministic, no atomics.
    return out_EN, (dot_part_NS.sum(dim=0) if dot_EN is not None else None)


def moe_ffn_triton_forward(
    x_TH: torch.Tensor,
    gate_up_proj_E2IH: torch.Tensor,
    down_proj_EHI: torch.Tensor,
    weights_TK: torch.Tensor,
    sort_order_S: torch.Tensor,
    expert_offsets_E1: torch.Tensor,
    activation=SWIGLU,
    gate_up_bias_E2I: torch.Tensor | None = None,
    down_bias_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward of the routed experts from raw routing tensors; `[T, H]` in x's dtype.

    The optional biases are added in the GEMM epilogues: `gate_up_bias_E2I` (`[E, 2I]` in
    gate_up_proj's row layout, `[E, I]` non-gated) before the activation, `down_bias_EH` `[E, H]`
    to each expert's output before the routing weight scales it: `Σ_j w_tj (W2 h + b2)`.
    """
    num_tokens, hidden = x_TH.shape
    top_k = weights_TK.shape[1]
    if num_tokens == 0:
        return x_TH.new_zeros(0, hidden)
    order_S, offsets_E1 = sort_order_S.contiguous(), expert_offsets_E1.contiguous()
    h_SI = _gate_up_swiglu(x_TH, gate_up_proj_E2IH, order_S, offsets_E1, top_k, activation, gate_up_bias_E2I)
    # down_proj[e] is [H, I]; viewed as [I, H] it is the right-hand operand of h @ W2[e].T.
    y_SH = _scatter_grouped_mm(
        h_SI,
        down_proj_EHI.transpose(1, 2),
        order_S,
        offsets_E1,
        weights_TK.reshape(-1).contiguous(),
        x_TH.dtype,
        down_bias_EH,
    )
    return _sum_slots(y_SH, num_tokens, top_k)


def _swiglu_backward(dy_TH, x_TH, w13_E2IH, w2_EHI, weights_TK, order_S, offsets_E1, activation, b13_E2I):
    """`(d(gate|up) [S, 2I] (d up [S, I] non-gated), w·h [S, I], d weights [S] fp32 in slot order,
    without the down bias's share)` from the fused recompute kernel."""
    num_tokens, hidden = x_TH.shape
    num_experts, two_inter, _ = w13_E2IH.shape
    inter = w2_EHI.shape[2]
    top_k = weights_TK.shape[1]
    num_slots = num_tokens * top_k
    dgu_S2I = _empty(num_slots, two_inter, device=x_TH.device, dtype=x_TH.dtype)
    hw_SI = _empty(num_slots, inter, device=x_TH.device, dtype=x_TH.dtype)
    n_tiles = triton.cdiv(inter, _BWD_BLOCK_N)
    dweight_part_NS = _empty(n_tiles, num_slots, device=x_TH.device, dtype=torch.float32)
    rows = _row_tiles(num_slots, num_experts)
    b13, *b13_strides = _bias_args(b13_E2I, x_TH)
    _swiglu_backward_kernel[lambda m: (rows(m) * n_tiles,)](
        x_TH, dy_TH, w13_E2IH, b13, w2_EHI, weights_TK.reshape(-1).contiguous(), order_S, offsets_E1,
        dgu_S2I, hw_SI, dweight_part_NS,
        num_experts, hidden, inter, num_slots, _rows_bucket(num_slots, num_experts),
        *x_TH.stride(), *dy_TH.stride(), *w13_E2IH.stride(), *w2_EHI.stride(), *b13_strides,
        dgu_S2I.stride(0), hw_SI.stride(0),
        UP_OFFSET=1 if activation.interleaved else inter,
        TOP_K=top_k, HAS_BIAS=b13_E2I is not None, BLOCK_E=_block_e(num_experts),
        DOT_PRECISION=_dot_precision(x_TH.dtype),
        **_activation_args(activation),
    )  # fmt: skip
    # Fixed-order sum of the per-I-tile partials: deterministic, no atomics.
    return dgu_S2I, hw_SI, dweight_part_NS.sum(dim=0)


def moe_ffn_triton_backward(
    grad_TH: torch.Tensor,
    x_TH: torch.Tensor,
    gate_up_proj_E2IH: torch.Tensor,
    down_proj_EHI: torch.Tensor,
    weights_TK: torch.Tensor,
    sort_order_S: torch.Tensor,
    expert_offsets_E1: torch.Tensor,
    needs: tuple[bool, bool, bool] = (True, True, True),
    activation=SWIGLU,
    gate_up_bias_E2I: torch.Tensor | None = None,
    down_bias_EH: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """`(dx [T,H], d gate_up_proj [E,2I,H], d down_proj [E,H,I], d weights [T,K],
    d gate_up_bias [E,2I], d down_bias [E,H])`.

    `needs` flags (dx, d gate_up_proj, d down_proj): a gradient not needed is skipped and
    returned as an empty `[0]` tensor, as is the gradient of an absent bias. The routing-weight
    gradient, and each given bias's, is always returned (as the reference does). Bias gradients
    are per-expert sums over the expert's sorted rows (`_expert_bias_grad_kernel`): of d(gate|up)
    for the gate/up bias, of `w · dy` for the down bias; the routing-weight gradient gains
    `dy · b2[e]`, since the weight scales the biased expert output.
    """
    num_tokens, top_k = weights_TK.shape
    needs_dx, needs_d_gate_up, needs_d_down = needs
    skipped = lambda: x_TH.new_empty(0)  # one per output: custom-op outputs must not alias
    biases = (gate_up_bias_E2I, down_bias_EH)
    if num_tokens == 0:
        zeros = [torch.zeros_like(t) if need else skipped() for t, need in
                 zip((x_TH, gate_up_proj_E2IH, down_proj_EHI), needs, strict=True)]  # fmt: skip
        zero_biases = [skipped() if b is None else torch.zeros_like(b) for b in biases]
        return (*zeros, torch.zeros_like(weights_TK), *zero_biases)
    order_S, offsets_E1 = sort_order_S.contiguous(), expert_offsets_E1.contiguous()
    dy_TH = grad_TH.to(x_TH.dtype)
    weights_S = weights_TK.reshape(-1).contiguous()
    dgu_S2I, hw_SI, d_weights_S = _swiglu_backward(
        dy_TH, x_TH, gate_up_proj_E2IH, down_proj_EHI, weights_TK, order_S, offsets_E1, activation,
        gate_up_bias_E2I,
    )  # fmt: skip
    d_down_bias = skipped()
    if down_bias_EH is not None:
        d_down_bias, dy_dot_bias_S = _expert_bias_grad(
            dy_TH,
            order_S,
            offsets_E1,
            top_k,
            gather=True,
            out_dtype=down_bias_EH.dtype,
            scale_S=weights_S,
            dot_EN=down_bias_EH,
        )
        d_weights_S = d_weights_S + dy_dot_bias_S
    d_weights = d_weights_S.view(num_tokens, top_k).to(weights_TK.dtype)
    # Ordered so each [S, ·] buffer is freed once its last reader has run (lower peak memory).
    d_down = skipped()
    if needs_d_down:
        d_down = _expert_weight_grad(
            dy_TH,
            hw_SI,
            order_S,
            offsets_E1,
            top_k,
            gather_a=True,
            gather_b=False,
            out_dtype=down_proj_EHI.dtype,
        )
    del hw_SI
    d_gate_up = skipped()
    if needs_d_gate_up:
        d_gate_up = _expert_weight_grad(
            dgu_S2I,
            x_TH,
            order_S,
            offsets_E1,
            top_k,
            gather_a=False,
            gather_b=True,
            out_dtype=gate_up_proj_E2IH.dtype,
        )
    d_gate_up_bias = skipped()
    if gate_up_bias_E2I is not None:
        d_gate_up_bias, _ = _expert_bias_grad(
            dgu_S2I, order_S, offsets_E1, top_k, gather=False, out_dtype=gate_up_bias_E2I.dtype
        )
    dx = skipped()
    if needs_dx:
        dx_SH = _scatter_grouped_mm(dgu_S2I, gate_up_proj_E2IH, order_S, offsets_E1, None, x_TH.dtype)
        del dgu_S2I
        dx = _sum_slots(dx_SH, num_tokens, top_k)
    return dx, d_gate_up, d_down, d_weights, d_gate_up_bias, d_down_bias
