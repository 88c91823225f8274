"""Knowledge-distillation losses, the public functions and their input validation: `kd_loss`
and `fused_linear_kd_loss` (KL family, per-token temperature, optionally fused with the LM head).

Every check except the NaN policy runs here, before any compute; the ops in op.py and the
functions in reference.py do not validate.

Shape legend: N token rows, V vocabulary, Hs / Ht student / teacher hidden size, K sparse
teacher support size.

Definitions (both public functions):
    a = z_S / tau_S     student logits over the student temperature (default 1)
    b = z_T / tau_T     teacher logits over the teacher temperature (`temperature`)
    q = softmax(a),  p = softmax(b)
    forward_kl       KL(p || q)
    reverse_kl       KL(q || p)
    jsd              beta KL(p || M) + (1 - beta) KL(q || M),  M = beta p + (1 - beta) q
                     (beta = 0.5 is the symmetric Jensen-Shannon divergence)
    skew_forward_kl  KL(p || beta p + (1 - beta) q)    (beta = 0 is forward_kl)
    skew_reverse_kl  KL(q || beta q + (1 - beta) p)    (beta = 0 is reverse_kl)
All math is fp32 whatever the input dtype; the gradient flows to the student only.

Temperatures: a float, or an `[N]` tensor with one temperature per row (e.g. one per
sequence, repeated over its tokens). `temperature_scaling=True` multiplies each row's loss by
tau_T^2 (Hinton et al.'s T^2 convention, which keeps gradient magnitudes comparable across
temperatures); the default is off, i.e. the plain divergence.

Rows: `mask [N]` (nonzero = kept) and/or `labels [N]` with `ignore_index` drop rows; a dropped
row contributes exactly 0 to the loss and to the gradient.
Reductions: "mean" = sum over kept rows / number of kept rows (0 if none is kept), "sum",
"none" = the `[N]` per-row losses (dropped rows are 0), "batchmean" = sum / N (N counts the
dropped rows too, as `torch.nn.functional.kl_div`'s batchmean does).

Extreme values: logits of +-1e4 are fine (fp32 log-sum-exp). -inf logits (a masked-out
vocabulary) give probability 0, and a term whose left-hand probability is 0 contributes 0
(0 log 0 = 0). So -inf in the same places for both models is finite for every divergence,
-inf in the teacher alone is finite for forward_kl, jsd and the skews. A term with
p_j > 0 = q_j (forward_kl) or q_j > 0 = p_j (reverse_kl) is a genuinely infinite divergence:
the row's loss is +inf (not NaN) and its gradient is not defined (forward_kl still returns
the finite q - p). Each row needs at least one finite student and one finite teacher logit.

NaN policy (`check_nan=True`, the default): a NaN never comes back silently as a loss.
  - reference backend: before any compute, one fused `isnan().any()` over the inputs (and a
    `> 0` check of temperature tensors); a NaN raises ValueError naming the tensor.
  - Triton backend: re-reading the [N, V] inputs would cost as much HBM traffic as the loss
    itself, so the check runs after the kernel on the `[N]` row losses: a NaN logit in a kept
    row always makes that row's loss NaN. Then the inputs are scanned to name the culprit and
    ValueError is raised (also for +inf logits or temperatures <= 0).
  Either way it is ONE host synchronisation per call on CUDA. It runs inside the custom op, so
  torch.compile graphs are unaffected. `check_nan=False` skips it (no sync): a NaN row then
  gives a NaN loss (visible, never turned into a finite value) unless the row is dropped by
  the mask.

The gradient is produced during the forward pass (the loss needs the same reads) and only
scaled in the backward, in place; rows whose upstream gradient is exactly 1 are not touched
(no host sync). Hence backpropagating twice through one graph (`retain_graph=True`) is not
supported.
"""

from __future__ import annotations

import torch

from .._dispatch import cpu_eager, resolve_backend
from . import op as _op  # noqa: F401  (registers the torch.library ops called below)
from .fused_linear import default_chunk_size
from .reference import DIVERGENCES, REDUCTIONS, as_rows_N, row_weights_N
from .teacher import SparseTeacher, TeacherHead

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float | torch.Tensor = 1.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    student_temperature: float | torch.Tensor = 1.0,
    temperature_scaling: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    check_nan: bool = True,
) -> torch.Tensor:
    """Distillation loss between student and teacher logits (see the module docstring).

    Args:
        student_logits: `[N, V]` fp32/fp16/bf16; receives the gradient (same dtype).
        teacher_logits: `[N, V]` float, must not require grad (detach it, or compute it under
            `torch.no_grad()`).
        divergence: "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl".
        temperature: teacher temperature, float > 0 or `[N]` tensor.
        beta: mixture weight in [0, 1] for jsd and the skews (ignored otherwise).
        mask: optional `[N]`, nonzero rows are kept.
        reduction: "mean" (over kept rows), "sum", "none" (`[N]`), "batchmean" (sum / N).
        backend: "auto" (Triton on CUDA, the PyTorch reference elsewhere), "triton", "reference".
        student_temperature: float > 0 or `[N]`; the student's logits are divided by it.
        temperature_scaling: multiply each row's loss by its teacher temperature squared.
        labels, ignore_index: rows whose label equals `ignore_index` are dropped.
        check_nan: raise ValueError on NaN inputs (one host sync on CUDA; see the NaN policy).

    Returns:
        A 0-d fp32 loss, or `[N]` fp32 for reduction="none".

    Example:
        >>> z_s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
        >>> z_t = torch.tensor([[0.0, 1.0, 2.0]])
        >>> kd_loss(z_s, z_t).item()
        0.0
    """
    _check_loss_options(divergence, beta, reduction, temperature_scaling)
    _check_logits(student_logits, teacher_logits)
    n_rows, device = student_logits.shape[0], student_logits.device
    if (
        mask is None
        and labels is None
        and not isinstance(temperature, torch.Tensor)
        and not isinstance(student_temperature, torch.Tensor)
    ):
        # Number temperatures, every row kept (the common call): the CPU path takes the numbers
        # and one weight straight through, with no `[N]` tensors built and read back (each
        # small op costs as much as an `[N, V]` pass at the default's shapes).
        tau_t = _temperature_value("temperature", temperature)
        tau_s = _temperature_value("student_temperature", student_temperature)
        resolved = resolve_backend(backend, student_logits, teacher_logits)
        if cpu_eager(resolved, student_logits, teacher_logits):
            compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
            w = _constant_weight(n_rows, reduction, temperature_scaling, tau_t)
            return _op.KdLossCPU.apply(
                student_logits, teacher_logits, tau_t, tau_s, w, divergence, float(beta), compute_grad,
                check_nan, reduction != "none",
            )  # fmt: skip
    tau_t_N, tau_s_N, w_N = _row_tensors(
        n_rows, device, temperature, student_temperature, mask, labels, ignore_index, reduction,
        temperature_scaling,
    )  # fmt: skip
    resolved = resolve_backend(backend, student_logits, teacher_logits)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if cpu_eager(resolved, student_logits, teacher_logits, tau_t_N, tau_s_N, w_N):
        # The same reference and backward as the op, without its dispatch cost (see KdLossCPU).
        # Rows weighted alike (no mask, labels or per-row T^2) pass their weight as a number.
        alike = (
            mask is None
            and labels is None
            and not (temperature_scaling and isinstance(temperature, torch.Tensor))
        )
        w = _constant_weight(n_rows, reduction, temperature_scaling, temperature) if alike else w_N
        loss_N = _op.KdLossCPU.apply(
            student_logits, teacher_logits, tau_t_N, tau_s_N, w, divergence, float(beta), compute_grad,
            check_nan, reduction != "none",
        )  # fmt: skip
        return loss_N
    loss_N, _ = torch.ops.padd.kd_loss(
        student_logits, teacher_logits, tau_t_N, tau_s_N, w_N, divergence, float(beta), compute_grad,
        check_nan, resolved,
    )  # fmt: skip
    return loss_N if reduction == "none" else loss_N.sum()


def fused_linear_kd_loss(
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
    backend: str = "auto",
    student_temperature: float | torch.Tensor = 1.0,
    temperature_scaling: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    check_nan: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`kd_loss(student_hidden @ student_head_weight^T + bias, teacher logits)` without the `[N, V]` logits.

    The student logits are built `chunk_size` rows at a time; each chunk's loss and logit
    gradient come from the logits kernel, and the gradients of the hidden states, head weight
    and bias are accumulated chunk by chunk in the forward pass. Peak extra memory is
    O(chunk_size x V), independent of N (default chunk: ~2^27 / V rows, a multiple of 128).

    Args:
        student_hidden: `[N, Hs]` fp32/fp16/bf16.
        student_head_weight: `[V, Hs]`, same dtype. `student_head_bias`: optional `[V]`.
        teacher: teacher logits `[N, V]`; or `TeacherHead(hidden [N, Ht], weight [V, Ht], bias)`
            (Ht may differ from Hs); or `SparseTeacher(ids [N, K], logprobs [N, K])`.
            Nothing in it may require grad.
        chunk_size: rows per chunk (default from V).
        Everything else: as `kd_loss`.

    Returns:
        A 0-d fp32 loss, or `[N]` fp32 for reduction="none" (whose backward recomputes the
        chunks, since the per-row upstream gradient is only known then).

    Example:
        >>> h, w = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        >>> loss = fused_linear_kd_loss(h, w, torch.randn(4, 11), divergence="jsd", chunk_size=2)
        >>> loss.backward()
    """
    _check_loss_options(divergence, beta, reduction, temperature_scaling)
    _check_student_head(student_hidden, student_head_weight, student_head_bias)
    n_rows, vocab = student_hidden.shape[0], student_head_weight.shape[0]
    teacher_args = _teacher_args(teacher, n_rows, vocab, student_hidden.device)
    if teacher_args["teacher_ids"] is not None and divergence == "reverse_kl":
        raise ValueError(
            "reverse_kl is infinite with a SparseTeacher (q > 0 off its support); use another divergence"
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = student_hidden.device
    tau_t_N, tau_s_N, w_N = _row_tensors(
        n_rows, device, temperature, student_temperature, mask, labels, ignore_index, reduction,
        temperature_scaling,
    )  # fmt: skip
    resolved = resolve_backend(backend, student_hidden, student_head_weight)
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_head_weight, student_head_bias)
    )
    # reduction="none" has a per-row upstream gradient: its backward recomputes instead.
    compute_grad = wants_grad and reduction != "none"
    args = (
        student_hidden.contiguous(), student_head_weight.contiguous(), student_head_bias,
        teacher_args["teacher_logits"], teacher_args["teacher_hidden"], teacher_args["teacher_head_weight"],
        teacher_args["teacher_head_bias"], teacher_args["teacher_ids"], teacher_args["teacher_logprobs"],
        tau_t_N, tau_s_N, w_N, divergence, float(beta), int(chunk_size), compute_grad, check_nan, resolved,
    )  # fmt: skip
    if cpu_eager(resolved, *(a for a in args if isinstance(a, torch.Tensor))):
        loss_N = _op.FusedLinearKdLossCPU.apply(*args)  # the op's code without its dispatch cost
    else:
        loss_N, *_ = torch.ops.padd.fused_linear_kd_loss(*args)
    return loss_N if reduction == "none" else loss_N.sum()


def _constant_weight(n_rows: int, reduction: str, temperature_scaling: bool, temperature: float) -> float:
    """`row_weights_N`'s value when every row is kept and the temperature is a number."""
    w = float(temperature) ** 2 if temperature_scaling else 1.0
    return w / max(n_rows, 1) if reduction in ("mean", "batchmean") else w


def _check_loss_options(divergence: str, beta: float, reduction: str, temperature_scaling: bool) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(beta, torch.Tensor) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a float in [0, 1], got {beta!r}")
    if not isinstance(temperature_scaling, bool):
        raise TypeError(f"temperature_scaling must be a bool, got {temperature_scaling!r}")


def _check_logits(student_NV: torch.Tensor, teacher_NV: torch.Tensor) -> None:
    for name, x in (("student_logits", student_NV), ("teacher_logits", teacher_NV)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [N, V], got {getattr(x, 'shape', type(x))}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be fp32/fp16/bf16, got {x.dtype}")
    if student_NV.shape != teacher_NV.shape:
        raise ValueError(
            f"student_logits {tuple(student_NV.shape)} and teacher_logits {tuple(teacher_NV.shape)} differ"
        )
    if student_NV.shape[1] == 0:
        raise ValueError("the vocabulary dimension V must be > 0")
    if student_NV.device != teacher_NV.device:
        raise ValueError(f"student_logits on {student_NV.device} but teacher_logits on {teacher_NV.device}")
    _refuse_teacher_grad("teacher_logits", teacher_NV)


def _refuse_teacher_grad(name: str, x: torch.Tensor | None) -> None:
    if x is not None and x.requires_grad:
        raise ValueError(
            f"{name} requires grad: the distillation gradient flows to the student only; "
            "pass a detached teacher (or compute it under torch.no_grad())"
        )


def _check_student_head(h_NH: torch.Tensor, w_VH: torch.Tensor, b_V: torch.Tensor | None) -> None:
    if h_NH.dim() != 2 or w_VH.dim() != 2:
        raise ValueError(f"student_hidden [N, Hs] and student_head_weight [V, Hs] must be 2-D, got "
                         f"{tuple(h_NH.shape)} and {tuple(w_VH.shape)}")  # fmt: skip
    if h_NH.shape[1] != w_VH.shape[1]:
        raise ValueError(f"student_hidden Hs={h_NH.shape[1]} != student_head_weight Hs={w_VH.shape[1]}")
    if h_NH.dtype not in _FLOAT_DTYPES or w_VH.dtype != h_NH.dtype:
        raise TypeError(
            f"student_hidden and student_head_weight must share a float dtype, got {h_NH.dtype}, {w_VH.dtype}"
        )
    if b_V is not None and (b_V.shape != (w_VH.shape[0],) or b_V.dtype != h_NH.dtype):
        raise ValueError(f"student_head_bias must be [V]={w_VH.shape[0]} of dtype {h_NH.dtype}, got "
                         f"{tuple(b_V.shape)} {b_V.dtype}")  # fmt: skip
    if w_VH.device != h_NH.device or (b_V is not None and b_V.device != h_NH.device):
        raise ValueError("student_hidden, student_head_weight and student_head_bias must be on one device")


def _teacher_args(teacher, n_rows: int, vocab: int, device: torch.device) -> dict:
    """Validate any teacher kind and spread it into the op's optional teacher arguments."""
    args = dict.fromkeys(
        ("teacher_logits", "teacher_hidden", "teacher_head_weight", "teacher_head_bias", "teacher_ids",
         "teacher_logprobs"),
    )  # fmt: skip
    if isinstance(teacher, torch.Tensor):
        _check_teacher_tensor("teacher logits", teacher, (n_rows, vocab), device)
        args["teacher_logits"] = teacher
    elif isinstance(teacher, TeacherHead):
        hidden, weight, bias = teacher
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            shapes = f"{tuple(hidden.shape)}, {tuple(weight.shape)}"
            raise ValueError(f"TeacherHead needs hidden [N, Ht] and weight [V, Ht], got {shapes}")
        _check_teacher_tensor("TeacherHead.hidden", hidden, (n_rows, hidden.shape[1]), device)
        _check_teacher_tensor("TeacherHead.weight", weight, (vocab, hidden.shape[1]), device)
        if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
            raise TypeError("TeacherHead hidden, weight and bias must share a dtype")
        if bias is not None:
            _check_teacher_tensor("TeacherHead.bias", bias, (vocab,), device)
        args.update(teacher_hidden=hidden, teacher_head_weight=weight, teacher_head_bias=bias)
    elif isinstance(teacher, SparseTeacher):
        ids, logprobs = teacher
        if ids.dim() != 2 or ids.shape[0] != n_rows or ids.dtype.is_floating_point or ids.shape[1] < 1:
            raise ValueError(
                f"SparseTeacher.ids must be integer [N={n_rows}, K>=1], got {tuple(ids.shape)} {ids.dtype}"
            )
        _check_teacher_tensor("SparseTeacher.logprobs", logprobs, tuple(ids.shape), device)
        if ids.device != device:
            raise ValueError(f"SparseTeacher.ids on {ids.device}, student on {device}")
        args.update(teacher_ids=ids, teacher_logprobs=logprobs)
    else:
        raise TypeError(f"teacher must be a logits tensor, TeacherHead or SparseTeacher, got {type(teacher)}")
    return args


def _check_teacher_tensor(name: str, x: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be fp32/fp16/bf16, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the student on {device}")
    _refuse_teacher_grad(name, x)


def _row_tensors(n_rows, device, temperature, student_temperature, mask, labels, ignore_index, reduction,
                 temperature_scaling):  # fmt: skip
    """The op's per-row inputs: teacher and student temperatures and loss weights, fp32 `[N]`."""
    tau_t_N = _temperature_rows("temperature", temperature, n_rows, device)
    tau_s_N = _temperature_rows("student_temperature", student_temperature, n_rows, device)
    keep_N = _keep_rows(mask, labels, ignore_index, n_rows, device)
    w_N = row_weights_N(
        n_rows,
        device,
        keep_N=keep_N,
        reduction=reduction,
        tau_t_N=tau_t_N,
        temperature_scaling=temperature_scaling,
    )
    return tau_t_N, tau_s_N, w_N


def _temperature_rows(name: str, value, n_rows: int, device: torch.device) -> torch.Tensor:
    """A float (> 0) or `[N]` / 0-d float tensor as fp32 `[N]` (tensor values are checked in the op)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
        if value.dim() == 0:
            value = value.reshape(1).expand(n_rows)
        if tuple(value.shape) != (n_rows,):
            raise ValueError(
                f"{name} must be a float or a tensor [N={n_rows}], got shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, the logits on {device}")
        if value.requires_grad:
            raise ValueError(f"{name} must not require grad")
        return value.float()
    return as_rows_N(_temperature_value(name, value), n_rows, device)


def _temperature_value(name: str, value) -> float:
    """A number temperature (> 0) as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def _keep_rows(mask, labels, ignore_index: int, n_rows: int, device: torch.device) -> torch.Tensor | None:
    """Boolean `[N]` of kept rows from `mask` (nonzero) and `labels != ignore_index`, or None."""
    keep_N = None
    for name, x in (("mask", mask), ("labels", labels)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (n_rows,):
            raise ValueError(f"{name} must be a tensor [N={n_rows}], got {getattr(x, 'shape', type(x))}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, the logits on {device}")
        rows_N = (x != 0) if name == "mask" else (x != ignore_index)
        keep_N = rows_N if keep_N is None else keep_N & rows_N
    return keep_N
