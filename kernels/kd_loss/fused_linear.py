"""KD loss fused with the student's LM head: logits are built C rows at a time, never [N, V].

Shape legend: N token rows, C rows per chunk, V vocabulary, Hs / Ht student / teacher hidden
size, K sparse teacher support.

Per chunk of C rows:
  student logits  z_S = h_S W_S^T (+ b_S)                      [C, V], input dtype
  teacher logits  given rows | h_T W_T^T (+ b_T) | sparse->dense [C, V], no grad
  loss_C, g_CV    the logits kernel (Triton, written into z_S's buffer) or the reference
  dh_C  = g_CV W_S,   dW_S += g_CV^T h_C,   db_S += sum_rows g_CV
Peak extra memory is two [C, V] buffers (plus dW_S, db_S and dh, the outputs), whatever N.
"""

from __future__ import annotations

import torch

from .reference import densify_sparse_teacher_NV, kd_loss_and_grad_reference

# Rows per chunk by default: about 2^27 logits per [C, V] buffer (256 MiB in bf16), a
# multiple of 128 rows so the GEMMs stay tile-aligned.
_CHUNK_ELEMENTS = 2**27


def default_chunk_size(n_rows: int, vocab_size: int) -> int:
    """Rows per chunk: ~2^27 / V rounded down to a multiple of 128 (at least 128), at most N."""
    rows = max(128, (_CHUNK_ELEMENTS // max(vocab_size, 1)) // 128 * 128)
    return max(1, min(rows, n_rows))


def teacher_chunk_CV(
    rows: slice,
    vocab_size: int,
    *,
    teacher_logits: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_head_weight: torch.Tensor | None,
    teacher_head_bias: torch.Tensor | None,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
) -> torch.Tensor:
    """The teacher logits of one chunk of rows, from whichever teacher kind was given."""
    if teacher_logits is not None:
        return teacher_logits[rows]
    if teacher_hidden is not None:
        return torch.nn.functional.linear(teacher_hidden[rows], teacher_head_weight, teacher_head_bias)
    # Sparse teacher as -inf off its support: softmax then renormalises over the K ids. Kept in
    # the log-probs' own dtype (fp32 log-probs stay exact).
    ids_CK, logprobs_CK = teacher_ids[rows], teacher_logprobs[rows]
    return densify_sparse_teacher_NV(ids_CK, logprobs_CK, vocab_size, logprobs_CK.dtype)


def chunk_loss_and_grad(
    logits_CV: torch.Tensor,
    teacher_CV: torch.Tensor,
    tau_t_C: torch.Tensor,
    tau_s_C: torch.Tensor,
    w_C: torch.Tensor,
    divergence: str,
    beta: float,
    compute_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss rows and logit gradient of one chunk; the Triton path reuses the logits' buffer."""
    if backend == "triton":
        from .triton import kd_loss_triton

        return kd_loss_triton(
            logits_CV,
            teacher_CV,
            tau_t_C,
            tau_s_C,
            w_C,
            divergence,
            beta,
            compute_grad,
            grad_out_NV=logits_CV,
        )
    return kd_loss_and_grad_reference(
        logits_CV, teacher_CV, tau_t_C, tau_s_C, w_C, divergence, beta, compute_grad
    )


def fused_linear_kd_forward(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    *,
    tau_t_N: torch.Tensor,
    tau_s_N: torch.Tensor,
    w_N: torch.Tensor,
    divergence: str,
    beta: float,
    chunk_size: int,
    compute_grad: bool,
    backend: str,
    **teacher: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Weighted per-row loss `[N]` fp32 and, if `compute_grad`, (dh `[N, Hs]`, dW `[V, Hs]`, db `[V]`).

    The grads are those of `sum(loss_N)` (upstream gradient 1); `w_N` folds in the mask, the
    reduction's normaliser and the optional T^2 factor. dW and db accumulate in their own dtype.
    """
    n_rows, vocab = hidden_NH.shape[0], weight_VH.shape[0]
    loss_N = torch.empty(n_rows, device=hidden_NH.device, dtype=torch.float32)
    grad_h_NH = torch.empty_like(hidden_NH) if compute_grad else None
    grad_w_VH = torch.zeros_like(weight_VH) if compute_grad else None
    grad_b_V = torch.zeros_like(bias_V) if compute_grad and bias_V is not None else None
    with torch.no_grad():
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, min(start + chunk_size, n_rows))
            h_CH = hidden_NH[rows]
            logits_CV = torch.nn.functional.linear(h_CH, weight_VH, bias_V)
            teacher_CV = teacher_chunk_CV(rows, vocab, **teacher)
            loss_N[rows], grad_CV = chunk_loss_and_grad(
                logits_CV, teacher_CV, tau_t_N[rows], tau_s_N[rows], w_N[rows], divergence, beta,
                compute_grad, backend,
            )  # fmt: skip
            del teacher_CV  # free before the backward GEMMs allocate
            if compute_grad:
                torch.matmul(grad_CV, weight_VH, out=grad_h_NH[rows])
                grad_w_VH.addmm_(grad_CV.t(), h_CH)
                if grad_b_V is not None:
                    grad_b_V += grad_CV.sum(0)
    return loss_N, grad_h_NH, grad_w_VH, grad_b_V
