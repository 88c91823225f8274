"""Triton kernels of the KD loss: per-row loss and student-logit gradient, chunked over V.

Shape legend: N token rows, V vocabulary.

A program takes one row at a time (rows pid, pid + P, ... for a grid of P programs; P = N by
default) and walks the vocabulary in blocks of BLOCK_V:
  sweep 1  online log-sum-exp of both a = z_S / tau_S and b = z_T / tau_T (and, for forward
           and reverse KL, the loss itself, accumulated online with the same rescaling);
  sweep 2  (jsd and skew variants only) the loss and the row dot S = sum_j q_j u_j, which their
           gradient needs and which depends on the final normalisers;
  last     the gradient g_j = w / tau_S * (r_j - q_j S), written once in the input dtype.
The softmax normalisers depend on the whole row, so a gradient cannot be written before the
row has been read once; forward/reverse KL read the logits twice, the mixtures three times,
and write the gradient once. The gradient buffer is the only [N, V] allocation (and the
fused-linear path passes the student logits chunk itself as the gradient buffer).

Gradient of a per-row divergence l(q) wrt a: d l / d a_j = q_j u_j - q_j sum_k q_k u_k with
u = d l / d q; we write r_j = q_j u_j (dropping constants of u, which cancel):
  forward_kl       r = -p                                   S = -1
  reverse_kl       r = q (log q - log p)                    S = l
  jsd              r = (1 - beta) q (log q - log M)         M = beta p + (1 - beta) q
  skew_forward_kl  r = -(1 - beta) p q / M                  M = beta p + (1 - beta) q
  skew_reverse_kl  r = q (log q - log M) - beta q^2 / M     M = beta q + (1 - beta) p
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import interpreter_enabled

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3, "skew_reverse_kl": 4}


@triton.jit
def _load_scaled(row_ptr, idx, V, inv_tau):
    """A block of logits in fp32 divided by the temperature; -inf past the end of the row."""
    x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
    return x * inv_tau


@triton.jit
def _online_update(m, s, x):
    """One online-softmax step: returns (new max, rescaled sum, exp(x - max), rescale factor)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    # An all -inf prefix keeps max = -inf; shift by 0 then so no inf - inf appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(x - m_safe)
    alpha = tl.exp(m - m_safe)
    return m_new, s * alpha + tl.sum(e, 0), e, alpha


@triton.jit
def _rescale(acc, alpha):
    # alpha underflowing to 0 means the old terms have p = 0 in fp32: they count 0 (0 log 0 = 0),
    # also when acc is already inf.
    return tl.where(alpha == 0.0, 0.0, acc * alpha)


@triton.jit
def _row_stats(s_row, t_row, V, inv_tau_s, inv_tau_t, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Sweep 1: max and log-sum of exp of a and b, and the forward/reverse KL of the row (else 0)."""
    cols = tl.arange(0, BLOCK_V)
    m_a = tl.full((), float("-inf"), tl.float32)
    m_b = tl.full((), float("-inf"), tl.float32)
    s_a = tl.zeros((), tl.float32)
    s_b = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)
    for off in range(0, V, BLOCK_V):
        a = _load_scaled(s_row, off + cols, V, inv_tau_s)
        b = _load_scaled(t_row, off + cols, V, inv_tau_t)
        m_a, s_a, e_a, alpha_a = _online_update(m_a, s_a, a)
        m_b, s_b, e_b, alpha_b = _online_update(m_b, s_b, b)
        if DIVERGENCE == 0:  # sum_j e^(b_j - m_b) (b_j - a_j), zero where p_j = 0
            acc = _rescale(acc, alpha_b) + tl.sum(tl.where(b > float("-inf"), e_b * (b - a), 0.0), 0)
        if DIVERGENCE == 1:  # sum_j e^(a_j - m_a) (a_j - b_j), zero where q_j = 0
            acc = _rescale(acc, alpha_a) + tl.sum(tl.where(a > float("-inf"), e_a * (a - b), 0.0), 0)
    log_s_a = tl.log(s_a)
    log_s_b = tl.log(s_b)
    loss = tl.zeros((), tl.float32)
    if DIVERGENCE == 0:  # KL(p||q) = sum p (b - a) - lse(b) + lse(a), lse = m + log s
        loss = acc / s_b + (m_a - m_b) + (log_s_a - log_s_b)
    if DIVERGENCE == 1:
        loss = acc / s_a + (m_b - m_a) + (log_s_b - log_s_a)
    return m_a, log_s_a, m_b, log_s_b, loss


@triton.jit
def _log_mix(log_x, log_y, beta):
    """log(beta x + (1 - beta) y) from log-probabilities, without underflow of x or y."""
    m = tl.maximum(log_x, log_y)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    mix = beta * tl.exp(log_x - m_safe) + (1.0 - beta) * tl.exp(log_y - m_safe)
    return tl.where(m == float("-inf"), float("-inf"), m_safe + tl.log(mix))


@triton.jit
def _xlogx_ratio(x, log_x, log_y):
    """x (log x - log y), with 0 where x = 0 (0 log 0 = 0)."""
    return tl.where(x > 0.0, x * (log_x - log_y), 0.0)


@triton.jit
def _mixture_terms(lq, lp, beta, DIVERGENCE: tl.constexpr):
    """Per-element (loss term, r term) of the mixture divergences (jsd, skew_*)."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    both = (lq > float("-inf")) & (lp > float("-inf"))
    if DIVERGENCE == 2:
        lm = _log_mix(lp, lq, beta)
        r = (1.0 - beta) * _xlogx_ratio(q, lq, lm)
        loss = beta * _xlogx_ratio(p, lp, lm) + r
    elif DIVERGENCE == 3:
        lm = _log_mix(lp, lq, beta)
        loss = _xlogx_ratio(p, lp, lm)
        r = tl.where(both, -(1.0 - beta) * tl.exp(lp + lq - lm), 0.0)
    else:
        lm = _log_mix(lq, lp, beta)
        loss = _xlogx_ratio(q, lq, lm)
        r = loss - beta * tl.where(lq > float("-inf"), tl.exp(2.0 * lq - lm), 0.0)
    return loss, r


@triton.jit
def _row_mixture_dot(
    s_row,
    t_row,
    V,
    inv_tau_s,
    inv_tau_t,
    m_a,
    log_s_a,
    m_b,
    log_s_b,
    beta,
    DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Sweep 2 of the mixture divergences: the row's loss and S = sum_j r_j."""
    cols = tl.arange(0, BLOCK_V)
    loss = tl.zeros((), tl.float32)
    dot = tl.zeros((), tl.float32)
    for off in range(0, V, BLOCK_V):
        lq = (_load_scaled(s_row, off + cols, V, inv_tau_s) - m_a) - log_s_a
        lp = (_load_scaled(t_row, off + cols, V, inv_tau_t) - m_b) - log_s_b
        loss_j, r_j = _mixture_terms(lq, lp, beta, DIVERGENCE)
        loss += tl.sum(loss_j, 0)
        dot += tl.sum(r_j, 0)
    return loss, dot


@triton.jit
def _r_terms(lq, lp, beta, DIVERGENCE: tl.constexpr):
    """r_j of the gradient formula (see the module docstring)."""
    if DIVERGENCE == 0:
        r = -tl.exp(lp)
    elif DIVERGENCE == 1:
        r = _xlogx_ratio(tl.exp(lq), lq, lp)
    else:
        _, r = _mixture_terms(lq, lp, beta, DIVERGENCE)
    return r


@triton.jit
def _write_row_grad(
    s_row,
    t_row,
    g_row,
    V,
    inv_tau_s,
    inv_tau_t,
    m_a,
    log_s_a,
    m_b,
    log_s_b,
    beta,
    dot,
    scale,
    DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Last sweep: g_j = scale * (r_j - q_j S), scale = w / tau_S, in the gradient's dtype."""
    cols = tl.arange(0, BLOCK_V)
    for off in range(0, V, BLOCK_V):
        idx = off + cols
        lq = (_load_scaled(s_row, idx, V, inv_tau_s) - m_a) - log_s_a
        lp = (_load_scaled(t_row, idx, V, inv_tau_t) - m_b) - log_s_b
        g = scale * (_r_terms(lq, lp, beta, DIVERGENCE) - tl.exp(lq) * dot)
        tl.store(g_row + idx, g.to(g_row.dtype.element_ty), mask=idx < V)


@triton.jit
def _zero_row(g_row, V, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    for off in range(0, V, BLOCK_V):
        tl.store(
            g_row + off + cols,
            tl.zeros((BLOCK_V,), tl.float32).to(g_row.dtype.element_ty),
            mask=off + cols < V,
        )


@triton.jit
def _kd_loss_row(
    row,
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    g_ptr,
    g_stride,
    tau_t_ptr,
    tau_t_stride,
    tau_s_ptr,
    tau_s_stride,
    w_ptr,
    loss_ptr,
    V,
    beta,
    DIVERGENCE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row: loss_N[row] = w * div(row) and, if COMPUTE_GRAD, g[row, :] = d loss / d z_S."""
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    w = tl.load(w_ptr + row)
    loss = tl.zeros((), tl.float32)
    if w == 0.0:  # masked row: skip the reads, contribute exactly 0
        if COMPUTE_GRAD:
            _zero_row(g_row, V, BLOCK_V)
    else:
        inv_tau_t = 1.0 / tl.load(tau_t_ptr + row * tau_t_stride)
        inv_tau_s = 1.0 / tl.load(tau_s_ptr + row * tau_s_stride)
        m_a, log_s_a, m_b, log_s_b, loss = _row_stats(
            s_row, t_row, V, inv_tau_s, inv_tau_t, DIVERGENCE, BLOCK_V
        )
        dot = tl.zeros((), tl.float32) - 1.0  # forward KL: S = -1
        if DIVERGENCE == 1:
            dot = loss
        if DIVERGENCE >= 2:
            loss, dot = _row_mixture_dot(
                s_row, t_row, V, inv_tau_s, inv_tau_t, m_a, log_s_a, m_b, log_s_b, beta, DIVERGENCE, BLOCK_V
            )
        if COMPUTE_GRAD:
            _write_row_grad(
                s_row,
                t_row,
                g_row,
                V,
                inv_tau_s,
                inv_tau_t,
                m_a,
                log_s_a,
                m_b,
                log_s_b,
                beta,
                dot,
                w * inv_tau_s,
                DIVERGENCE,
                BLOCK_V,
            )
        loss = w * loss
    tl.store(loss_ptr + row, loss)


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    g_ptr,
    g_stride,
    tau_t_ptr,
    tau_t_stride,
    tau_s_ptr,
    tau_s_stride,
    w_ptr,
    loss_ptr,
    n_rows,
    V,
    beta,
    DIVERGENCE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Rows pid, pid + P, pid + 2P, ... for a grid of P programs (P = N: one row each).

    A persistent grid (P ~ a few per SM) keeps few rows in flight, so a row's second sweep
    may still find it in L2; which grid is faster is measured by the benchmark.
    """
    for row_i in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(row_i, tl.int64)  # int64: row * stride overflows int32 at N * V > 2^31
        _kd_loss_row(
            row,
            s_ptr,
            s_stride,
            t_ptr,
            t_stride,
            g_ptr,
            g_stride,
            tau_t_ptr,
            tau_t_stride,
            tau_s_ptr,
            tau_s_stride,
            w_ptr,
            loss_ptr,
            V,
            beta,
            DIVERGENCE,
            COMPUTE_GRAD,
            BLOCK_V,
        )


@triton.jit
def _scale_rows_kernel(g_ptr, g_stride, go_ptr, go_stride, V, BLOCK_V: tl.constexpr):
    """g[row, :] *= go[row] in place; a row whose factor is exactly 1 is not touched."""
    row = tl.program_id(0).to(tl.int64)
    go = tl.load(go_ptr + row * go_stride).to(tl.float32)
    if go != 1.0:  # the usual loss.backward(): no read or write of the gradient at all
        g_row = g_ptr + row * g_stride
        cols = tl.arange(0, BLOCK_V)
        for off in range(0, V, BLOCK_V):
            idx = off + cols
            g = tl.load(g_row + idx, mask=idx < V).to(tl.float32)
            tl.store(g_row + idx, (g * go).to(g_row.dtype.element_ty), mask=idx < V)


def _block_v(vocab_size: int, block_v: int | None) -> int:
    """Block over the vocabulary: 8192 on GPU, smaller in the interpreter (numpy per block).

    8192 with 16 warps beat 4096 with 8 warps on an H100 by 8-23% for JSD and up to 1.4x for
    forward KL at V=32000 (equal at V>=128k); benchmarks/results/kd_loss-gpu-20261123.json."""
    if block_v is not None:
        return block_v
    cap = 1024 if interpreter_enabled() else 8192
    return min(cap, triton.next_power_of_2(vocab_size))


def kd_loss_triton(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    tau_t_N: torch.Tensor,
    tau_s_N: torch.Tensor,
    w_N: torch.Tensor,
    divergence: str,
    beta: float,
    compute_grad: bool,
    *,
    grad_out_NV: torch.Tensor | None = None,
    block_v: int | None = None,
    num_programs: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted per-row loss `[N]` fp32 and gradient `[N, V]` (student dtype) in one launch.

    `grad_out_NV` may be `student_logits_NV` itself: each element is read before it is
    overwritten in the last sweep, so the gradient can replace the logits in place.
    `num_programs`: grid size (default N, one row per program); fewer makes it persistent.
    `block_v`, `num_programs`, `num_warps` are tuning knobs for the benchmark and tests.
    """
    n_rows, vocab = student_logits_NV.shape
    student_NV = _row_major(student_logits_NV)
    teacher_NV = _row_major(teacher_logits_NV)
    loss_N = torch.empty(n_rows, device=student_NV.device, dtype=torch.float32)
    grad_NV = None
    if compute_grad:
        grad_NV = torch.empty_like(student_NV) if grad_out_NV is None else grad_out_NV
    if n_rows == 0:
        return loss_N, grad_NV
    grid = n_rows if num_programs is None else max(1, min(num_programs, n_rows))
    block = _block_v(vocab, block_v)
    if num_warps is None:
        num_warps = 16 if block >= 8192 else 8
    g_arg = grad_NV if grad_NV is not None else student_NV  # never written when not computing
    tau_t_N, tau_s_N, w_N = (x.to(torch.float32) for x in (tau_t_N, tau_s_N, w_N))
    w_N = w_N.contiguous()
    _kd_loss_fwd_kernel[(grid,)](
        student_NV,
        student_NV.stride(0),
        teacher_NV,
        teacher_NV.stride(0),
        g_arg,
        g_arg.stride(0),
        tau_t_N,
        tau_t_N.stride(0),
        tau_s_N,
        tau_s_N.stride(0),
        w_N,
        loss_N,
        n_rows,
        vocab,
        float(beta),
        DIVERGENCE=DIVERGENCE_CODES[divergence],
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return loss_N, grad_NV


def scale_rows_triton_(
    grad_NV: torch.Tensor, grad_output_N: torch.Tensor, *, block_v: int | None = None
) -> None:
    """In place `grad_NV *= grad_output_N[:, None]`, skipping rows whose factor is 1 (no sync)."""
    n_rows, vocab = grad_NV.shape
    if n_rows == 0:
        return
    go_N = grad_output_N.expand(n_rows)
    _scale_rows_kernel[(n_rows,)](
        grad_NV,
        grad_NV.stride(0),
        go_N,
        go_N.stride(0),
        vocab,
        BLOCK_V=_block_v(vocab, block_v),
        num_warps=8,
    )


def _row_major(x_NV: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along V (any row stride is fine)."""
    return x_NV if x_NV.stride(-1) == 1 else x_NV.contiguous()
