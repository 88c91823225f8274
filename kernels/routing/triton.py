"""Fused top-k routing in Triton: scores, selection, weights and permutation metadata.

Shape legend: T tokens, E experts, K = top_k, S = T·K slots (slot `s = t·K + j`), B token
blocks of BLOCK_T rows, BE = E rounded up to a power of two.

Three launches, no host synchronisation, no atomics (so the result is bit-deterministic):
1. `_route_topk_kernel`, one program per token block: fp32 scores (softmax or sigmoid),
   logsumexp, top-k on `logits + bias` (ties to the lower id), gathered and optionally
   renormalised weights, the optional full scores, and the block's expert histogram.
2. `_route_scan_kernel`, one program per chunk of experts: per-block exclusive prefix of the
   histograms over blocks, and tokens per expert.
3. `_route_permute_kernel`, one program per token block: the expert offsets (a cumsum of the
   counts, recomputed by each program), then each slot's position in the stable sort by expert,
   `offsets[e] + prefix[b, e] + (earlier slots of the block that chose e)`, which is exactly
   the order a stable sort of the flattened expert ids gives.

`routing_metadata_triton` builds the same metadata from expert ids chosen elsewhere
(`routing_from_topk`): `_route_histogram_kernel` stands in for kernel 1.

The backward (`route_backward_triton`) recomputes the scores from the logits (and the saved
logsumexp) in one pass and writes d logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Per-program budget: BLOCK_T · BE elements per [BLOCK_T, BE] tile. 2048 with 8 warps keeps the
# forward near 80 and the backward near 150 registers on sm_90, with no spills (E = 64..256).
_TILE_ELEMS = 2048
# The scan walks [BLOCK_B blocks, BLOCK_EC experts] tiles of <= 4096 counts; up to
# _SCAN_MAX_BLOCK_B blocks per step keeps its serial steps to 1-2 at T = 32768.
_SCAN_MAX_BLOCK_B = 1024
_SCAN_TILE = 4096
_MIN_SUM = 1e-20  # same clamp as the reference's renormalisation


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here; tests poison it (NaN / INT32_MIN) to catch gaps."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _block_t(num_experts: int) -> int:
    block_e = triton.next_power_of_2(num_experts)
    return max(1, min(64, _TILE_ELEMS // block_e))


def _num_warps(block_t: int, block_e: int) -> int:
    return 8 if block_t * block_e >= 2048 else 4


def _scan_blocks(num_blocks: int, block_e: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_EC) of the scan: as many blocks per step as the tile allows."""
    block_b = min(_SCAN_MAX_BLOCK_B, max(16, triton.next_power_of_2(num_blocks)))
    return block_b, max(1, min(block_e, _SCAN_TILE // block_b))


@triton.jit
def _route_topk_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    experts_ptr,
    scores_ptr,
    lse_ptr,
    counts_ptr,
    T,
    E,
    stride_lt,
    stride_le,
    K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    WRITE_SCORES: tl.constexpr,
    MIN_SUM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols_E = tl.arange(0, BLOCK_E)
    row_ok_T = rows_T < T
    col_ok_E = cols_E < E
    ok_TE = row_ok_T[:, None] & col_ok_E[None, :]
    rows64_T = rows_T.to(tl.int64)

    x_ptrs = logits_ptr + rows64_T[:, None] * stride_lt + cols_E[None, :] * stride_le
    x_TE = tl.load(x_ptrs, mask=ok_TE, other=float("-inf")).to(tl.float32)

    if SOFTMAX:
        m_T = tl.max(x_TE, axis=1)
        m_T = tl.where(row_ok_T, m_T, 0.0)  # padded rows are all -inf: keep them NaN-free
        e_TE = tl.where(ok_TE, tl.exp(x_TE - m_T[:, None]), 0.0)
        sum_T = tl.sum(e_TE, axis=1)
        sum_T = tl.where(row_ok_T, sum_T, 1.0)
        p_TE = e_TE / sum_T[:, None]
        tl.store(lse_ptr + rows_T, m_T + tl.log(sum_T), mask=row_ok_T)
    else:
        p_TE = tl.sigmoid(x_TE)

    if WRITE_SCORES:
        s_ptrs = scores_ptr + rows64_T[:, None] * E + cols_E[None, :]
        tl.store(s_ptrs, p_TE, mask=ok_TE)

    key_TE = x_TE
    if HAS_BIAS:  # softmax: bias on the logits; sigmoid: on the scores (DeepSeek-V3)
        b_E = tl.load(bias_ptr + cols_E, mask=col_ok_E, other=0.0).to(tl.float32)
        if SOFTMAX:
            key_TE = x_TE + b_E[None, :]
        else:
            key_TE = p_TE + b_E[None, :]
    # One int64 max per choice instead of a max, an arg-min and a gather: the high word is the
    # key mapped to an order-preserving int32, the low word BLOCK_E - 1 - column, so among equal
    # keys the lower expert id wins. `+ 0.0` turns -0.0 into +0.0, which compare equal as floats.
    bits_TE = (key_TE + 0.0).to(tl.int32, bitcast=True)
    mono_TE = bits_TE ^ ((bits_TE >> 31) & 0x7FFFFFFF)
    packed_TE = (mono_TE.to(tl.int64) << 32) | (BLOCK_E - 1 - cols_E[None, :]).to(tl.int64)
    # Padding and picked entries sit below every real key (-inf included).
    taken = -9223372036854775807 - 1
    packed_TE = tl.where(ok_TE, packed_TE, taken)
    cols_K = tl.arange(0, BLOCK_K)
    idx_TK = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best_T = tl.max(packed_TE, axis=1)
        idx_T = BLOCK_E - 1 - (best_T & 0xFFFFFFFF).to(tl.int32)
        packed_TE = tl.where(cols_E[None, :] == idx_T[:, None], taken, packed_TE)
        idx_TK = tl.where(cols_K[None, :] == j, idx_T[:, None], idx_TK)

    # Weights from the unbiased logits of the chosen experts (just read, so an L1/L2 hit).
    out_ok = row_ok_T[:, None] & (cols_K[None, :] < K)
    xk_ptrs = logits_ptr + rows64_T[:, None] * stride_lt + idx_TK * stride_le
    x_TK = tl.load(xk_ptrs, mask=out_ok, other=0.0).to(tl.float32)
    if SOFTMAX:
        w_TK = tl.where(out_ok, tl.exp(x_TK - m_T[:, None]) / sum_T[:, None], 0.0)
    else:
        w_TK = tl.where(out_ok, tl.sigmoid(x_TK), 0.0)

    if RENORMALIZE:
        w_TK = w_TK / tl.maximum(tl.sum(w_TK, axis=1), MIN_SUM)[:, None]
    out_ptrs = rows64_T[:, None] * K + cols_K[None, :]
    tl.store(weights_ptr + out_ptrs, w_TK, mask=out_ok)
    tl.store(experts_ptr + out_ptrs, idx_TK, mask=out_ok)

    picked_TE = ok_TE & (packed_TE == taken)  # exactly the K chosen columns of every valid row
    counts_E = tl.sum(picked_TE.to(tl.int32), axis=0)
    tl.store(counts_ptr + pid * E + cols_E, counts_E, mask=col_ok_E)


@triton.jit
def _route_scan_kernel(
    counts_ptr,
    prefix_ptr,
    tokens_per_expert_ptr,
    num_blocks,
    E,
    BLOCK_B: tl.constexpr,
    BLOCK_EC: tl.constexpr,
):
    # One program per chunk of BLOCK_EC experts: few, wide steps down the blocks keep the serial
    # latency low (a single program over all experts would walk num_blocks / BLOCK_B tiles).
    cols_E = tl.program_id(0) * BLOCK_EC + tl.arange(0, BLOCK_EC)
    col_ok_E = cols_E < E
    running_E = tl.zeros([BLOCK_EC], dtype=tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        rows_B = b0 + tl.arange(0, BLOCK_B)
        ok_BE = (rows_B < num_blocks)[:, None] & col_ok_E[None, :]
        ptrs_BE = rows_B[:, None] * E + cols_E[None, :]
        c_BE = tl.load(counts_ptr + ptrs_BE, mask=ok_BE, other=0)
        excl_BE = tl.cumsum(c_BE, axis=0) - c_BE + running_E[None, :]
        tl.store(prefix_ptr + ptrs_BE, excl_BE, mask=ok_BE)
        running_E += tl.sum(c_BE, axis=0)
    tl.store(tokens_per_expert_ptr + cols_E, running_E, mask=col_ok_E)


@triton.jit
def _block_expert_counts(
    experts_ptr, slot0_T, row_ok_T, cols_E, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr
):
    """[BLOCK_T, BLOCK_E] int32: how many of each token's K slots went to each expert."""
    picked_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for j in tl.static_range(K):
        idx_T = tl.load(experts_ptr + slot0_T + j, mask=row_ok_T, other=BLOCK_E)
        picked_TE += (cols_E[None, :] == idx_T[:, None]).to(tl.int32)
    return picked_TE


@triton.jit
def _route_histogram_kernel(
    experts_ptr,
    counts_ptr,
    T,
    E,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Per-block expert histogram of given expert ids (routing decided elsewhere).
    pid = tl.program_id(0)
    rows_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols_E = tl.arange(0, BLOCK_E)
    picked_TE = _block_expert_counts(experts_ptr, rows_T * K, rows_T < T, cols_E, K, BLOCK_T, BLOCK_E)
    tl.store(counts_ptr + pid * E + cols_E, tl.sum(picked_TE, axis=0), mask=cols_E < E)


@triton.jit
def _route_permute_kernel(
    experts_ptr,
    prefix_ptr,
    tokens_per_expert_ptr,
    offsets_ptr,
    sort_order_ptr,
    inverse_ptr,
    T,
    E,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols_E = tl.arange(0, BLOCK_E)
    row_ok_T = rows_T < T
    col_ok_E = cols_E < E
    slot0_T = rows_T * K  # S < 2^31 is checked on the host

    # Every program derives the expert offsets itself (E values); program 0 publishes them.
    counts_E = tl.load(tokens_per_expert_ptr + cols_E, mask=col_ok_E, other=0)
    incl_E = tl.cumsum(counts_E, axis=0)
    if pid == 0:
        tl.store(offsets_ptr + 1 + cols_E, incl_E, mask=col_ok_E)
        tl.store(offsets_ptr + cols_E, tl.zeros([BLOCK_E], dtype=tl.int32), mask=cols_E == 0)

    # Slot (t, j) of expert e goes after every earlier slot of e: those of the earlier blocks
    # (prefix), of the block's earlier tokens (an exclusive cumsum down the rows) and the token's
    # own earlier choices (`seen`; only repeated ids given to `routing_from_topk` have any).
    picked_TE = _block_expert_counts(experts_ptr, slot0_T, row_ok_T, cols_E, K, BLOCK_T, BLOCK_E)
    base_E = incl_E - counts_E + tl.load(prefix_ptr + pid * E + cols_E, mask=col_ok_E, other=0)
    pos_TE = tl.cumsum(picked_TE, axis=0) - picked_TE + base_E[None, :]
    for j in tl.static_range(K):
        idx_T = tl.load(experts_ptr + slot0_T + j, mask=row_ok_T, other=BLOCK_E)
        hit_TE = cols_E[None, :] == idx_T[:, None]
        pos_T = tl.sum(tl.where(hit_TE, pos_TE, 0), axis=1)
        pos_TE += hit_TE.to(tl.int32)
        slot_T = slot0_T + j
        tl.store(sort_order_ptr + pos_T, slot_T, mask=row_ok_T)
        tl.store(inverse_ptr + slot_T, pos_T, mask=row_ok_T)


@triton.jit
def _route_backward_kernel(
    logits_ptr,
    lse_ptr,
    experts_ptr,
    grad_weights_ptr,
    grad_scores_ptr,
    grad_lse_ptr,
    grad_logits_ptr,
    T,
    E,
    stride_lt,
    stride_le,
    K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_GRAD_W: tl.constexpr,
    HAS_GRAD_SCORES: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    MIN_SUM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols_E = tl.arange(0, BLOCK_E)
    row_ok_T = rows_T < T
    col_ok_E = cols_E < E
    ok_TE = row_ok_T[:, None] & col_ok_E[None, :]
    rows64_T = rows_T.to(tl.int64)

    x_ptrs = logits_ptr + rows64_T[:, None] * stride_lt + cols_E[None, :] * stride_le
    x_TE = tl.load(x_ptrs, mask=ok_TE, other=0.0).to(tl.float32)
    if SOFTMAX:
        lse_T = tl.load(lse_ptr + rows_T, mask=row_ok_T, other=0.0)
        p_TE = tl.where(ok_TE, tl.exp(x_TE - lse_T[:, None]), 0.0)
    else:
        p_TE = tl.sigmoid(x_TE)

    # g = d loss / d scores, accumulated from the three differentiable outputs.
    if HAS_GRAD_SCORES:
        gs_ptrs = grad_scores_ptr + rows64_T[:, None] * E + cols_E[None, :]
        g_TE = tl.load(gs_ptrs, mask=ok_TE, other=0.0).to(tl.float32)
    else:
        g_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)

    if HAS_GRAD_W:
        # Scatter the k weight gradients onto their columns; chosen columns are distinct.
        slot0_T = rows64_T * K
        gw_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        chosen_TE = cols_E[None, :] < 0
        for j in tl.static_range(K):
            idx_T = tl.load(experts_ptr + slot0_T + j, mask=row_ok_T, other=BLOCK_E)
            gw_T = tl.load(grad_weights_ptr + slot0_T + j, mask=row_ok_T, other=0.0)
            hit_TE = cols_E[None, :] == idx_T[:, None]
            gw_TE = tl.where(hit_TE, gw_T[:, None], gw_TE)
            chosen_TE = chosen_TE | hit_TE
        if RENORMALIZE:
            # w_j = r_j / max(S, MIN_SUM), S = Σ r_j:
            # d r_j = gw_j / max(S, MIN_SUM) - [S >= MIN_SUM] Σ_i gw_i r_i / max(S, MIN_SUM)²
            sum_T = tl.sum(tl.where(chosen_TE, p_TE, 0.0), axis=1)
            dot_T = tl.sum(gw_TE * p_TE, axis=1)
            denom_T = tl.maximum(sum_T, MIN_SUM)
            shift_T = tl.where(sum_T >= MIN_SUM, dot_T / (denom_T * denom_T), 0.0)
            gw_TE = tl.where(chosen_TE, gw_TE / denom_T[:, None] - shift_T[:, None], 0.0)
        g_TE += gw_TE

    if SOFTMAX:
        inner_T = tl.sum(g_TE * p_TE, axis=1)
        if HAS_GRAD_LSE:
            # d lse / d x = p, so the lse gradient folds into the softmax Jacobian's shift.
            inner_T -= tl.load(grad_lse_ptr + rows_T, mask=row_ok_T, other=0.0)
        dx_TE = p_TE * (g_TE - inner_T[:, None])
    else:
        dx_TE = g_TE * p_TE * (1.0 - p_TE)

    dx_ptrs = grad_logits_ptr + rows64_T[:, None] * E + cols_E[None, :]
    tl.store(dx_ptrs, dx_TE.to(grad_logits_ptr.dtype.element_ty), mask=ok_TE)


def _metadata_buffers(num_tokens: int, top_k: int, num_experts: int, dev: torch.device) -> tuple:
    """(tokens_per_expert_E, expert_offsets_E1, sort_order_S, inverse_order_S), int32."""
    num_slots = num_tokens * top_k
    if num_slots >= 2**31:
        raise ValueError(f"T·top_k = {num_slots} slots overflow the int32 permutation")
    # The kernels write every element; only T = 0 (no launch) needs explicit zeros.
    alloc = torch.zeros if num_tokens == 0 else _empty
    return (
        alloc(num_experts, dtype=torch.int32, device=dev),
        alloc(num_experts + 1, dtype=torch.int32, device=dev),
        _empty(num_slots, dtype=torch.int32, device=dev),
        _empty(num_slots, dtype=torch.int32, device=dev),
    )


def _launch_scan_and_permute(experts_TK: torch.Tensor, counts_BE: torch.Tensor, metadata: tuple) -> None:
    """Kernels 2 and 3: from per-block histograms to counts, offsets and the permutation."""
    tokens_per_expert_E, offsets_E1, sort_order_S, inverse_S = metadata
    num_tokens, top_k = experts_TK.shape
    num_blocks, num_experts = counts_BE.shape
    block_e = triton.next_power_of_2(num_experts)
    block_t = _block_t(num_experts)
    prefix_BE = _empty(num_blocks, num_experts, dtype=torch.int32, device=counts_BE.device)
    scan_b, scan_e = _scan_blocks(num_blocks, block_e)
    _route_scan_kernel[(triton.cdiv(num_experts, scan_e),)](
        counts_BE, prefix_BE, tokens_per_expert_E, num_blocks, num_experts,
        BLOCK_B=scan_b, BLOCK_EC=scan_e, num_warps=8,
    )  # fmt: skip
    _route_permute_kernel[(num_blocks,)](
        experts_TK, prefix_BE, tokens_per_expert_E, offsets_E1, sort_order_S, inverse_S, num_tokens,
        num_experts, K=top_k, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=_num_warps(block_t, block_e),
    )  # fmt: skip


def routing_metadata_triton(experts_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """`routing_metadata` of given expert ids `[T, K]` (each in [0, E)), in three launches.

    Returns `(tokens_per_expert_E, expert_offsets_E1, sort_order_S, inverse_order_S)`, int32.
    """
    num_tokens, top_k = experts_TK.shape
    metadata = _metadata_buffers(num_tokens, top_k, num_experts, experts_TK.device)
    if num_tokens == 0:
        return metadata
    experts_TK = experts_TK.to(torch.int32).contiguous()
    block_e = triton.next_power_of_2(num_experts)
    block_t = _block_t(num_experts)
    num_blocks = triton.cdiv(num_tokens, block_t)
    counts_BE = _empty(num_blocks, num_experts, dtype=torch.int32, device=experts_TK.device)
    _route_histogram_kernel[(num_blocks,)](
        experts_TK, counts_BE, num_tokens, num_experts,
        K=top_k, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=_num_warps(block_t, block_e),
    )  # fmt: skip
    _launch_scan_and_permute(experts_TK, counts_BE, metadata)
    return metadata


def route_forward_triton(
    logits_TE: torch.Tensor,
    top_k: int,
    score: str,
    bias_E: torch.Tensor | None,
    renormalize: bool,
    return_scores: bool,
) -> tuple[torch.Tensor, ...]:
    """Launch the three forward kernels; inputs are assumed validated.

    Returns `(weights_TK f32, experts_TK i32, tokens_per_expert_E i32, expert_offsets_E1 i32,
    sort_order_S i32, inverse_order_S i32, scores_TE f32 ([0, E] unless return_scores),
    logsumexp_T f32 ([0] for sigmoid))`.
    """
    num_tokens, num_experts = logits_TE.shape
    dev = logits_TE.device
    softmax = score == "softmax"
    f32, i32 = torch.float32, torch.int32
    metadata = _metadata_buffers(num_tokens, top_k, num_experts, dev)
    weights_TK = _empty(num_tokens, top_k, dtype=f32, device=dev)
    experts_TK = _empty(num_tokens, top_k, dtype=i32, device=dev)
    scores_TE = _empty(num_tokens if return_scores else 0, num_experts, dtype=f32, device=dev)
    lse_T = _empty(num_tokens if softmax else 0, dtype=f32, device=dev)
    outputs = (weights_TK, experts_TK, *metadata, scores_TE, lse_T)
    if num_tokens == 0:
        return outputs

    block_e = triton.next_power_of_2(num_experts)
    block_t = _block_t(num_experts)
    num_blocks = triton.cdiv(num_tokens, block_t)
    counts_BE = _empty(num_blocks, num_experts, dtype=i32, device=dev)
    # Unused pointer arguments get a live tensor: an empty one may carry a null data pointer.
    _route_topk_kernel[(num_blocks,)](
        logits_TE, bias_E if bias_E is not None else logits_TE, weights_TK, experts_TK,
        scores_TE if return_scores else weights_TK, lse_T if softmax else weights_TK, counts_BE,
        num_tokens, num_experts, logits_TE.stride(0), logits_TE.stride(1),
        K=top_k, SOFTMAX=softmax, HAS_BIAS=bias_E is not None, RENORMALIZE=renormalize,
        WRITE_SCORES=return_scores, MIN_SUM=_MIN_SUM, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=_num_warps(block_t, block_e),
    )  # fmt: skip
    _launch_scan_and_permute(experts_TK, counts_BE, metadata)
    return outputs


def route_backward_triton(
    logits_TE: torch.Tensor,
    lse_T: torch.Tensor,
    experts_TK: torch.Tensor,
    grad_weights_TK: torch.Tensor | None,
    grad_scores_TE: torch.Tensor | None,
    grad_lse_T: torch.Tensor | None,
    score: str,
    renormalize: bool,
) -> torch.Tensor:
    """d logits `[T, E]` (logits' dtype) from the gradients of weights, scores and logsumexp."""
    num_tokens, num_experts = logits_TE.shape
    grad_logits_TE = _empty(num_tokens, num_experts, dtype=logits_TE.dtype, device=logits_TE.device)
    if num_tokens == 0:
        return grad_logits_TE
    top_k = experts_TK.shape[1]
    block_e = triton.next_power_of_2(num_experts)
    block_t = _block_t(num_experts)
    dummy = logits_TE
    contig = lambda g: g.contiguous() if g is not None else dummy
    _route_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits_TE, lse_T if score == "softmax" else dummy, experts_TK.contiguous(),
        contig(grad_weights_TK), contig(grad_scores_TE), contig(grad_lse_T), grad_logits_TE,
        num_tokens, num_experts, logits_TE.stride(0), logits_TE.stride(1),
        K=top_k, SOFTMAX=score == "softmax", RENORMALIZE=renormalize,
        HAS_GRAD_W=grad_weights_TK is not None, HAS_GRAD_SCORES=grad_scores_TE is not None,
        HAS_GRAD_LSE=grad_lse_T is not None, MIN_SUM=_MIN_SUM,
        BLOCK_T=block_t, BLOCK_E=block_e, num_warps=_num_warps(block_t, block_e),
    )  # fmt: skip
    return grad_logits_TE
