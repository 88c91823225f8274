"""Pure-PyTorch knowledge-distillation losses: the CPU path and the test oracle of the kernels.

Shape legend: N token rows, V vocabulary, H hidden size (Hs student, Ht teacher), K sparse
teacher support size. `_N`, `_NV`, `_VH` ... suffixes name a tensor's shape.

The reference functions take the same arguments as the public ones in api.py (less the
implementation knobs `backend`, `check_nan`, `chunk_size`) and validate nothing.
`kd_loss_and_grad_reference` and `scale_rows_reference_` are the hand-written forward-with-
gradient and backward that the custom ops of op.py run on CPU (the Triton kernels' twins).

Math (see `padd.kernels.kd_loss.api` for the full contract):
    a = z_S / tau_S,  b = z_T / tau_T          (per-row temperatures)
    q = softmax(a) (student),  p = softmax(b) (teacher)
    forward_kl      KL(p || q)
    reverse_kl      KL(q || p)
    jsd             beta KL(p || M) + (1 - beta) KL(q || M),   M = beta p + (1 - beta) q
    skew_forward_kl KL(p || beta p + (1 - beta) q)
    skew_reverse_kl KL(q || beta q + (1 - beta) p)
with 0 log 0 = 0 (a term whose left-hand probability is exactly 0 contributes 0).
"""

from __future__ import annotations

import math
import threading

import torch

from .teacher import SparseTeacher, TeacherHead

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
REDUCTIONS = ("mean", "sum", "none", "batchmean")


def kl_rows_N(log_x_NV: torch.Tensor, log_y_NV: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(x || y) = sum_j x_j (log x_j - log y_j) from log-probabilities, 0 log 0 = 0."""
    x_NV = log_x_NV.exp()
    # Double `where` so a -inf entry of x yields 0 (not 0 * inf = nan) in value and gradient.
    diff_NV = torch.where(x_NV > 0, log_x_NV - log_y_NV, torch.zeros_like(log_x_NV))
    return (x_NV * diff_NV).sum(-1)


def log_mix_NV(log_x_NV: torch.Tensor, log_y_NV: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta x + (1 - beta) y) from log-probabilities, finite-gradient when both are -inf."""
    m_NV = torch.maximum(log_x_NV, log_y_NV)
    empty_NV = m_NV == float("-inf")
    m_safe_NV = torch.where(empty_NV, torch.zeros_like(m_NV), m_NV)
    mix_NV = beta * (log_x_NV - m_safe_NV).exp() + (1.0 - beta) * (log_y_NV - m_safe_NV).exp()
    mix_safe_NV = torch.where(empty_NV, torch.ones_like(mix_NV), mix_NV)
    return torch.where(empty_NV, m_NV, m_safe_NV + mix_safe_NV.log())


def divergence_rows_N(log_q_NV: torch.Tensor, log_p_NV: torch.Tensor, divergence: str, beta: float):
    """Per-row divergence between student log-probs `log_q` and teacher log-probs `log_p`."""
    if divergence == "forward_kl":
        return kl_rows_N(log_p_NV, log_q_NV)
    if divergence == "reverse_kl":
        return kl_rows_N(log_q_NV, log_p_NV)
    if divergence == "jsd":
        log_m_NV = log_mix_NV(log_p_NV, log_q_NV, beta)
        return beta * kl_rows_N(log_p_NV, log_m_NV) + (1.0 - beta) * kl_rows_N(log_q_NV, log_m_NV)
    if divergence == "skew_forward_kl":
        return kl_rows_N(log_p_NV, log_mix_NV(log_p_NV, log_q_NV, beta))
    if divergence == "skew_reverse_kl":
        return kl_rows_N(log_q_NV, log_mix_NV(log_q_NV, log_p_NV, beta))
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def as_rows_N(value: float | torch.Tensor, n_rows: int, device: torch.device) -> torch.Tensor:
    """A float or `[N]` tensor as an fp32 `[N]` tensor (a stride-0 view for a float)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(n_rows)
    return torch.full((1,), float(value), device=device, dtype=torch.float32).expand(n_rows)


def row_weights_N(
    n_rows: int,
    device: torch.device,
    *,
    keep_N: torch.Tensor | None,
    reduction: str,
    tau_t_N: torch.Tensor,
    temperature_scaling: bool,
) -> torch.Tensor:
    """Weight of each row's divergence in the returned loss (mask, T^2 scale, reduction).

    Every reduction is a weighted sum of per-row divergences, which lets the kernels apply the
    mask and the normaliser row by row without a host sync: mean divides by the number of
    kept rows (a device tensor), batchmean by N, sum and none by 1.
    """
    if keep_N is None:
        w_N = torch.ones(n_rows, device=device, dtype=torch.float32)
    else:
        w_N = keep_N.to(device=device, dtype=torch.float32)
    if temperature_scaling:
        w_N = w_N * tau_t_N * tau_t_N
    if reduction == "mean" and keep_N is None:
        w_N = w_N / max(n_rows, 1)
    elif reduction == "mean":
        w_N = w_N / keep_N.float().sum().clamp_min(1.0)  # a device tensor: no host sync
    elif reduction == "batchmean":
        w_N = w_N / max(n_rows, 1)
    return w_N


def weighted_rows_N(div_N: torch.Tensor, w_N: torch.Tensor) -> torch.Tensor:
    """`w * div`, with masked rows (w = 0) exactly 0 even when their divergence is inf."""
    return torch.where(w_N != 0, w_N * div_N, torch.zeros_like(div_N))


def kd_rows_reference(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    tau_t_N: torch.Tensor,
    tau_s_N: torch.Tensor,
    divergence: str,
    beta: float,
) -> torch.Tensor:
    """Unweighted per-row divergence `[N]` fp32; differentiable in the student logits."""
    log_q_NV = torch.log_softmax(student_logits_NV.float() / tau_s_N[:, None], dim=-1)
    log_p_NV = torch.log_softmax(teacher_logits_NV.float() / tau_t_N[:, None], dim=-1)
    return divergence_rows_N(log_q_NV, log_p_NV, divergence, beta)


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float | torch.Tensor = 1.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    student_temperature: float | torch.Tensor = 1.0,
    temperature_scaling: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The plain, differentiable PyTorch KD loss (no validation; see `padd.kernels.kd_loss.api`).

    Same arguments as `kd_loss` less `backend` and `check_nan`: logits `[N, V]`, temperatures
    float or `[N]`, `mask` / `labels` `[N]`. Returns a 0-d fp32 loss, or `[N]` for "none".
    """
    student_logits_NV, teacher_logits_NV = student_logits, teacher_logits
    n_rows, device = student_logits_NV.shape[0], student_logits_NV.device
    tau_t_N = as_rows_N(temperature, n_rows, device)
    tau_s_N = as_rows_N(student_temperature, n_rows, device)
    keep_N = None if mask is None else mask != 0
    if labels is not None:
        labelled_N = labels != ignore_index
        keep_N = labelled_N if keep_N is None else keep_N & labelled_N
    w_N = row_weights_N(
        n_rows,
        device,
        keep_N=keep_N,
        reduction=reduction,
        tau_t_N=tau_t_N,
        temperature_scaling=temperature_scaling,
    )
    div_N = kd_rows_reference(
        student_logits_NV, teacher_logits_NV.detach(), tau_t_N, tau_s_N, divergence, beta
    )
    loss_N = weighted_rows_N(div_N, w_N)
    return loss_N if reduction == "none" else loss_N.sum()


def _xlogx_ratio_NV(x_NV: torch.Tensor, log_x_NV: torch.Tensor, log_y_NV: torch.Tensor) -> torch.Tensor:
    """x (log x - log y) with 0 where x = 0."""
    return torch.where(x_NV > 0, x_NV * (log_x_NV - log_y_NV), torch.zeros_like(x_NV))


def r_terms_NV(log_q_NV: torch.Tensor, log_p_NV: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """r = q * d div / d q (up to constants, which cancel): d div / d a = r - q * sum(r).

    forward_kl: -p;  reverse_kl: q (log q - log p);  jsd: (1 - beta) q (log q - log M);
    skew_forward_kl: -(1 - beta) p q / M;  skew_reverse_kl: q (log q - log M) - beta q^2 / M.
    """
    q_NV, p_NV = log_q_NV.exp(), log_p_NV.exp()
    zeros_NV = torch.zeros_like(q_NV)
    if divergence == "forward_kl":
        return -p_NV
    if divergence == "reverse_kl":
        return _xlogx_ratio_NV(q_NV, log_q_NV, log_p_NV)
    if divergence == "jsd":
        return (1.0 - beta) * _xlogx_ratio_NV(q_NV, log_q_NV, log_mix_NV(log_p_NV, log_q_NV, beta))
    if divergence == "skew_forward_kl":
        log_m_NV = log_mix_NV(log_p_NV, log_q_NV, beta)
        both_NV = (q_NV > 0) & (p_NV > 0)
        return torch.where(both_NV, -(1.0 - beta) * (log_p_NV + log_q_NV - log_m_NV).exp(), zeros_NV)
    log_m_NV = log_mix_NV(log_q_NV, log_p_NV, beta)
    sq_NV = torch.where(q_NV > 0, (2.0 * log_q_NV - log_m_NV).exp(), zeros_NV)
    return _xlogx_ratio_NV(q_NV, log_q_NV, log_m_NV) - beta * sq_NV


def kd_loss_and_grad_reference(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    tau_t_N: torch.Tensor,
    tau_s_N: torch.Tensor,
    w_N: torch.Tensor | float,
    divergence: str,
    beta: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted per-row loss `[N]` fp32 and its gradient wrt the student logits (input dtype).

    The same contract and closed-form gradient as the Triton kernel (no autograd, so it also
    runs inside a custom op): the gradient of sum_rows w * div for an upstream gradient of 1,
    d/dz_S = w / tau_S * (r - q sum(r)). Tests check it against autograd of `kd_rows_reference`.

    On CPU, forward_kl, reverse_kl and jsd take `_fast_rows` (the CPU path users run: it must
    not be slower than eager `log_softmax` + `kl_div` + autograd), with the guarded formulas
    below only for the rows that need them (-inf logits, NaN inputs); elsewhere (and for the
    skews) every row takes the guarded formulas.
    """
    with torch.no_grad():
        if student_logits_NV.device.type == "cpu" and divergence in _FAST_DIVERGENCES:
            return _kd_loss_and_grad_cpu(
                student_logits_NV, teacher_logits_NV, tau_t_N, tau_s_N, w_N, divergence, beta, compute_grad
            )
        n_rows, device = student_logits_NV.shape[0], student_logits_NV.device
        tau_t_N, tau_s_N = as_rows_N(tau_t_N, n_rows, device), as_rows_N(tau_s_N, n_rows, device)
        if not isinstance(w_N, torch.Tensor):  # one weight for every row (see _kd_loss_and_grad_cpu)
            w_N = torch.full_like(tau_s_N, w_N)
        log_q_NV = torch.log_softmax(student_logits_NV.float() / tau_s_N[:, None], dim=-1)
        log_p_NV = torch.log_softmax(teacher_logits_NV.float() / tau_t_N[:, None], dim=-1)
        loss_N = weighted_rows_N(divergence_rows_N(log_q_NV, log_p_NV, divergence, beta), w_N)
        if not compute_grad:
            return loss_N, None
        grad_NV = _guarded_grad_NV(log_q_NV, log_p_NV, divergence, beta)
        scale_N = torch.where(w_N != 0, w_N / tau_s_N, torch.zeros_like(w_N))
        grad_NV = torch.where(scale_N[:, None] != 0, grad_NV * scale_N[:, None], torch.zeros_like(grad_NV))
    return loss_N, grad_NV.to(student_logits_NV.dtype)


def _guarded_grad_NV(log_q_NV: torch.Tensor, log_p_NV: torch.Tensor, divergence: str, beta: float):
    """Unscaled gradient `r - q sum(r)` with every 0 log 0 guard."""
    r_NV = r_terms_NV(log_q_NV, log_p_NV, divergence, beta)
    return r_NV - log_q_NV.exp() * r_NV.sum(-1, keepdim=True)


_FAST_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _constant_rows(x_N: torch.Tensor | float) -> float | None:
    """A float (what `kd_loss`'s CPU path passes for a float temperature), or the value of a
    stride-0 CPU row tensor (a float argument expanded by `as_rows_N`), else None. A float
    temperature then skips its `[N, V]` division (tau = 1) or divides by a number."""
    if isinstance(x_N, float):
        return x_N
    if x_N.device.type != "cpu" or x_N.dim() != 1 or x_N.numel() == 0 or x_N.stride(0) != 0:
        return None
    return float(x_N[0])


def _log_softmax_rows_NV(z_NV: torch.Tensor, tau_N: torch.Tensor) -> torch.Tensor:
    """fp32 `log_softmax(z / tau)`, rows of `z` over `tau_N` `[N]`."""
    z_NV = z_NV.float()
    tau = _constant_rows(tau_N)
    if tau is None:
        z_NV = z_NV / tau_N[:, None]
    elif tau != 1.0:
        z_NV = z_NV / tau
    return torch.log_softmax(z_NV, dim=-1)


class _Workspace(threading.local):
    """Per-thread scratch memory of the CPU forward_kl path, reused across calls.

    Why: at the default's shapes (2048 x 100 fp32 = 800 KB a buffer) each fresh `[N, V]`
    allocation comes from glibc's heap, and freeing several of them at the end of a call makes
    glibc trim the heap, so the next call page-faults them in again: measured ~200 faults (about
    as long as an `exp` pass) per buffer per call on the 2-core machine. Scratch that never leaves
    the loss lives here instead; the gradient (returned to autograd) is always a fresh tensor.
    Capped, so a large vocabulary allocates per call as before instead of pinning memory."""

    cap_numel = 8 * 1024 * 1024  # 32 MiB of fp32 per buffer at most

    def __init__(self) -> None:
        self.flat: list[torch.Tensor | None] = [None, None]
        self.views: list[tuple] = [(), ()]  # the last (n_rows, vocab, view) handed out

    def buffer(self, i: int, n_rows: int, vocab: int) -> torch.Tensor | None:
        """Scratch `[n_rows, vocab]` fp32 CPU buffer number `i` (contents undefined), or None
        above the cap. Grows only, so a varying N reuses one buffer."""
        last = self.views[i]
        if last and last[0] == n_rows and last[1] == vocab:  # no slicing ops on a repeat
            return last[2]
        numel = n_rows * vocab
        if numel > self.cap_numel:
            return None
        flat = self.flat[i]
        if flat is None or flat.numel() < numel:
            flat = self.flat[i] = torch.empty(max(numel, 1), dtype=torch.float32)
        view = flat[:numel].view(n_rows, vocab)
        self.views[i] = (n_rows, vocab, view)
        return view


_WORKSPACE = _Workspace()


def _shifted_rows_NV(z_NV: torch.Tensor, tau: float | None, tau_N, out: torch.Tensor | None) -> torch.Tensor:
    """fp32 `z / tau - rowmax(z / tau)` (what log_softmax subtracts first), written into `out`
    if given, else into a new tensor. `tau` is the constant temperature (None: per row)."""
    z_NV = z_NV.float()  # fp16/bf16 inputs: fp32 math (a no-op for fp32)
    if tau is None:
        a_NV = torch.div(z_NV, tau_N[:, None], out=out) if out is not None else z_NV / tau_N[:, None]
    elif tau != 1.0:
        a_NV = torch.div(z_NV, tau, out=out) if out is not None else z_NV / tau
    else:
        m_N1 = z_NV.amax(-1, keepdim=True)
        return torch.sub(z_NV, m_N1, out=out) if out is not None else z_NV - m_N1
    return a_NV.sub_(a_NV.amax(-1, keepdim=True))


def _forward_kl_rows(
    student_NV: torch.Tensor,
    teacher_NV: torch.Tensor,
    tau_s: float | None,
    tau_s_N: torch.Tensor | None,
    tau_t: float | None,
    tau_t_N: torch.Tensor | None,
    compute_grad: bool,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_fast_rows` for forward_kl, from the logits: KL(p || q) per row and `scale` (q - p).

    Why not log_softmax: log_softmax exponentiates each row and throws the exponentials away,
    so p and q then cost a second `exp` pass each (the most expensive pass on CPU). Here each
    side is exponentiated once, from its shifted logits a' = a - max a, b' = b - max b:
        q = e^a' / s_a,  p = e^b' / s_b           (s = row sums of the exponentials)
        log p - log q = (b' - a') - (log s_b - log s_a)
        KL = sum(e^b' (b' - a')) / s_b - (log s_b - log s_a)        (sum p = 1)
        grad = scale (e^a' / s_a - e^b' / s_b)   (autograd's q sum(p) - p, with sum(p) = s_b / s_b)
    Six `[N, V]` passes after the two shifts, three `[N, V]` buffers, two of them reused
    (`_WORKSPACE`); the gradient overwrites the student's shifted logits. Same NaN contract as
    `_fast_rows`: a 0 * inf term (-inf in the teacher, or in both) makes its row NaN, and the
    caller redoes it with the guarded formulas; p > 0 = q gives +inf, as it should."""
    n_rows, vocab = student_NV.shape
    b_NV = _shifted_rows_NV(teacher_NV, tau_t, tau_t_N, _WORKSPACE.buffer(0, n_rows, vocab))
    # The student's shifted logits become q's numerator, then the gradient: a fresh tensor
    # when it is returned, scratch otherwise.
    a_out = None if compute_grad else _WORKSPACE.buffer(1, n_rows, vocab)
    a_NV = _shifted_rows_NV(student_NV, tau_s, tau_s_N, a_out)
    e_b_NV = torch.exp(b_NV, out=_WORKSPACE.buffer(1, n_rows, vocab)) if compute_grad else b_NV.exp()
    s_b_N1 = e_b_NV.sum(-1, keepdim=True)
    x_N1 = b_NV.sub_(a_NV).mul_(e_b_NV).sum(-1, keepdim=True)  # sum(e^b' (b' - a'))
    e_a_NV = a_NV.exp_()
    s_a_N1 = e_a_NV.sum(-1, keepdim=True)
    # log(s_a / s_b) + x / s_b: three [N] ops (each small op costs as much as a pass at small N).
    div_N = torch.div(s_a_N1, s_b_N1).log_().addcdiv_(x_N1, s_b_N1).squeeze(1)
    if not compute_grad:
        return div_N, None
    if scale != 1.0:  # fold the scale into q's row sums and p's `value`: no extra [N, V] pass
        s_a_N1 = s_a_N1.div_(scale)
    return div_N, e_a_NV.div_(s_a_N1).addcdiv_(e_b_NV, s_b_N1, value=-scale)


def _fast_rows(
    log_q_NV: torch.Tensor,
    log_p_NV: torch.Tensor,
    divergence: str,
    beta: float,
    compute_grad: bool,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unweighted per-row divergence `[N]` and `scale` times the gradient `[N, V]` (`r - q sum(r)`,
    see `r_terms_NV`; for jsd without its `1 - beta` factor), overwriting both log-prob buffers.

    The fewest `[N, V]` passes the math allows (each one is memory-bound on CPU), and no 0 log 0
    guards: a term whose left-hand probability is 0 at a -inf log-probability is NaN here, so
    its row's divergence is NaN (as is the row of any NaN gradient entry) and the caller
    recomputes that row with the guarded formulas. The mixture M of jsd is formed in
    probability space (one `lerp` pass instead of `log_mix_NV`'s dozen).
    """
    if divergence == "forward_kl":  # KL(p || q): r = -p, so grad = q sum(p) - p
        p_NV = log_p_NV.exp()
        div_N = log_p_NV.sub_(log_q_NV).mul_(p_NV).sum(-1)
        if not compute_grad:
            return div_N, None
        # scale (q sum(p) - p) in two passes: the scale rides on the row factor and the alpha.
        return div_N, log_q_NV.exp_().mul_(p_NV.sum(-1, keepdim=True) * scale).add_(p_NV, alpha=-scale)
    if divergence == "reverse_kl":  # KL(q || p): r = q (log q - log p), sum(r) = div
        q_NV = log_q_NV.exp()
        r_NV = log_q_NV.sub_(log_p_NV).mul_(q_NV)
        div_N = r_NV.sum(-1)
        if not compute_grad:
            return div_N, None
        grad_NV = r_NV.addcmul_(q_NV, div_N[:, None], value=-1.0)
        return div_N, grad_NV if scale == 1.0 else grad_NV.mul_(scale)
    # jsd: beta KL(p || M) + (1 - beta) KL(q || M); r = (1 - beta) q (log q - log M)
    p_NV, q_NV = log_p_NV.exp(), log_q_NV.exp()
    log_m_NV = torch.lerp(q_NV, p_NV, beta).log_()  # M = beta p + (1 - beta) q
    kl_pm_N = log_p_NV.sub_(log_m_NV).mul_(p_NV).sum(-1)
    rq_NV = log_q_NV.sub_(log_m_NV).mul_(q_NV)
    kl_qm_N = rq_NV.sum(-1)
    div_N = beta * kl_pm_N + (1.0 - beta) * kl_qm_N
    if not compute_grad:
        return div_N, None
    grad_NV = rq_NV.addcmul_(q_NV, kl_qm_N[:, None], value=-1.0)
    return div_N, grad_NV if scale == 1.0 else grad_NV.mul_(scale)


def _kd_loss_and_grad_cpu(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    tau_t_N: torch.Tensor,
    tau_s_N: torch.Tensor,
    w_N: torch.Tensor | float,
    divergence: str,
    beta: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`kd_loss_and_grad_reference` on CPU: `_fast_rows`, then the guarded formulas for the
    rows whose divergence came out NaN (found with an `[N]` check: no host sync on CPU).

    The temperatures may be floats (`kd_loss`'s eager CPU call, which builds no `[N]` tensors
    for them). `w_N` may be a float, one weight for every row (no mask, no per-row T^2: what `kd_loss`
    passes then): with a float student temperature the whole gradient scale is then a number
    folded into `_fast_rows`' last passes, and no row needs the dropped-row handling. At small
    N x V every small op's dispatch costs as much as an `[N, V]` pass."""
    w = w_N if isinstance(w_N, float) else None
    tau_s = _constant_rows(tau_s_N)
    jsd_factor = 1.0 - beta if divergence == "jsd" else 1.0
    scale = w * jsd_factor / tau_s if w is not None and tau_s is not None else 1.0
    if divergence == "forward_kl":
        tau_t = _constant_rows(tau_t_N)
        div_N, grad_NV = _forward_kl_rows(
            student_logits_NV, teacher_logits_NV, tau_s, tau_s_N, tau_t, tau_t_N, compute_grad, scale
        )
    else:
        log_q_NV = _log_softmax_rows_NV(student_logits_NV, tau_s_N)
        log_p_NV = _log_softmax_rows_NV(teacher_logits_NV, tau_t_N)
        div_N, grad_NV = _fast_rows(log_q_NV, log_p_NV, divergence, beta, compute_grad, scale)
    redo_grad_RV = None
    # div is finite, +inf or NaN (never -inf), so its sum is NaN exactly when a row is: one op
    # and one read instead of isnan + any + bool.
    if math.isnan(div_N.sum().item()):
        n_rows, device = student_logits_NV.shape[0], student_logits_NV.device
        tau_t_N, tau_s_N = as_rows_N(tau_t_N, n_rows, device), as_rows_N(tau_s_N, n_rows, device)
        redo_R = torch.isnan(div_N).nonzero().squeeze(1)
        log_q_RV = _log_softmax_rows_NV(student_logits_NV[redo_R], tau_s_N[redo_R])
        log_p_RV = _log_softmax_rows_NV(teacher_logits_NV[redo_R], tau_t_N[redo_R])
        div_N[redo_R] = divergence_rows_N(log_q_RV, log_p_RV, divergence, beta)
        if compute_grad:
            redo_grad_RV = _guarded_grad_NV(log_q_RV, log_p_RV, divergence, beta)
    if w is not None:
        if w == 0.0:
            return torch.zeros_like(div_N), (torch.zeros_like(grad_NV) if compute_grad else None)
        loss_N = div_N * w
        if not compute_grad:
            return loss_N, None
        row_scale_N = None if tau_s is not None else w * jsd_factor / tau_s_N
        if row_scale_N is not None:
            grad_NV.mul_(row_scale_N[:, None])
        if redo_grad_RV is not None:
            grad_NV[redo_R] = redo_grad_RV * (w / tau_s_N[redo_R, None])
        dtype = student_logits_NV.dtype
        return loss_N, grad_NV if grad_NV.dtype == dtype else grad_NV.to(dtype)
    keep_N = w_N != 0
    loss_N = torch.where(keep_N, w_N * div_N, 0.0)  # a dropped row is 0 even where div is inf
    if not compute_grad:
        return loss_N, None
    scale_N = w_N if tau_s == 1.0 else torch.where(keep_N, w_N / tau_s_N, 0.0)
    grad_NV.mul_((scale_N * jsd_factor if jsd_factor != 1.0 else scale_N)[:, None])
    if redo_grad_RV is not None:
        grad_NV[redo_R] = redo_grad_RV * torch.where(keep_N, w_N / tau_s_N, 0.0)[redo_R, None]
    if not bool(keep_N.all()):  # a dropped row's gradient is exactly 0, even where it is NaN
        grad_NV[~keep_N] = 0.0
    return loss_N, grad_NV.to(student_logits_NV.dtype)


def scale_rows_reference_(grad_NV: torch.Tensor, grad_output_N: torch.Tensor) -> None:
    """In place `grad_NV *= grad_output_N[:, None]`: the backward of `kd_loss_and_grad_reference`'s
    gradient for a per-row upstream gradient (`grad_output_N` `[N]`, possibly stride 0).

    On CPU an upstream gradient of exactly 1 everywhere (`loss.backward()` of a mean or sum)
    skips the `[N, V]` pass: checking N values costs nothing there."""
    if grad_NV.device.type == "cpu" and bool((grad_output_N == 1).all()):
        return
    grad_NV.mul_(grad_output_N.reshape(-1, 1).to(grad_NV.dtype))


def densify_sparse_teacher_NV(
    ids_NK: torch.Tensor, logprobs_NK: torch.Tensor, vocab_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Teacher logits `[N, V]` that are `logprobs` at `ids` and -inf elsewhere.

    softmax(dense / tau) is then the sparse teacher renormalised over its K support: exactly
    the sparse-teacher distribution of `fused_linear_kd_loss`.
    """
    dense_NV = torch.full(
        (ids_NK.shape[0], vocab_size), float("-inf"), device=logprobs_NK.device, dtype=dtype
    )
    return dense_NV.scatter_(1, ids_NK.long(), logprobs_NK.to(dtype))


def teacher_logits_reference(
    teacher: torch.Tensor | TeacherHead | SparseTeacher, vocab_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The dense teacher logits `[N, V]` for any of the three teacher kinds (no grad); a
    `SparseTeacher` is densified in `dtype`."""
    with torch.no_grad():
        if isinstance(teacher, TeacherHead):
            return torch.nn.functional.linear(teacher.hidden, teacher.weight, teacher.bias)
        if isinstance(teacher, SparseTeacher):
            return densify_sparse_teacher_NV(teacher.ids, teacher.logprobs, vocab_size, dtype)
        return teacher


def fused_linear_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher: torch.Tensor | TeacherHead | SparseTeacher,
    *,
    student_head_bias: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float | torch.Tensor = 1.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    student_temperature: float | torch.Tensor = 1.0,
    temperature_scaling: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Unfused oracle: materialise the student logits `[N, V]`, then `kd_loss_reference`.

    Same arguments as `fused_linear_kd_loss` less `backend`, `check_nan` and `chunk_size`:
    `student_hidden` `[N, Hs]`, `student_head_weight` `[V, Hs]`, `student_head_bias` `[V]`,
    `teacher` logits `[N, V]`, a `TeacherHead` or a `SparseTeacher`.
    """
    student_logits_NV = torch.nn.functional.linear(student_hidden, student_head_weight, student_head_bias)
    teacher_NV = teacher_logits_reference(teacher, student_head_weight.shape[0], torch.float32)
    return kd_loss_reference(
        student_logits_NV,
        teacher_NV,
        divergence=divergence,
        temperature=temperature,
        beta=beta,
        mask=mask,
        reduction=reduction,
        student_temperature=student_temperature,
        temperature_scaling=temperature_scaling,
        labels=labels,
        ignore_index=ignore_index,
    )
