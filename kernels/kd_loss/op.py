"""`torch.library` custom ops of the KD losses: one autograd path for every backend.

Shape legend: N token rows, V vocabulary, H hidden size (Hs student, Ht teacher), K sparse
teacher support.

Ops (all opaque to torch.compile, with fake implementations and registered autograd):
  padd::kd_loss               (student, teacher, tau_t, tau_s, w, ...) -> (loss_N, grad_NV)
  padd::kd_scale_rows_        grad_NV *= grad_output_N[:, None] in place (backward of the above)
  padd::fused_linear_kd_loss  (hidden, head, bias?, teacher..., ...) -> (loss_N, dh, dW, db)
                              (its chunked pass over the rows is fused_linear.py)
`backend` ("triton" | "reference") is resolved by the public functions in api.py, which also
validate every input first: "triton" runs the kernels of triton.py (CUDA, or CPU under
TRITON_INTERPRET=1), imported on first use so that the reference path works where
`import triton` fails; "reference" runs the PyTorch code of reference.py. The NaN policy
(`check_nan`) runs here, inside the ops, so torch.compile graphs are unaffected by it.

The gradients are computed in the forward pass (the loss needs the same reads), for an upstream
gradient of 1 per row; the backward only scales them, in place. Consequence: backpropagating
twice through the same graph (`retain_graph=True`) is not supported.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .fused_linear import fused_linear_kd_forward
from .reference import kd_loss_and_grad_reference, scale_rows_reference_


def check_finite_inputs(
    named: dict[str, torch.Tensor | None], tau_t: torch.Tensor, tau_s: torch.Tensor
) -> None:
    """Raise ValueError naming inputs holding a NaN or temperatures <= 0 (one host sync in all).

    The reference backend runs this before any compute (it reads every input once more).
    """
    present = {k: v for k, v in named.items() if v is not None and v.is_floating_point()}
    flags = [torch.isnan(v).any() for v in present.values()]
    names = [f"NaN in {k}" for k in present]
    # `not > 0` also catches NaN temperatures. A float temperature (`KdLossCPU`) was checked
    # by `kd_loss` already.
    for name, tau in (("temperature", tau_t), ("student_temperature", tau_s)):
        if isinstance(tau, torch.Tensor):
            flags.append((~(tau > 0)).any())
            names.append(f"{name} <= 0 or NaN")
    flags_F = torch.stack(flags)
    if bool(flags_F.any()):
        bad = [k for k, flag in zip(names, flags_F.tolist(), strict=True) if flag]
        raise ValueError(f"kd_loss: invalid input ({'; '.join(bad)}); the loss would be NaN")


def check_loss_rows(
    loss_N: torch.Tensor, named: dict[str, torch.Tensor | None], tau_t: torch.Tensor, tau_s: torch.Tensor
) -> None:
    """The Triton backend's NaN check: after the kernel, on the `[N]` row losses only.

    A NaN logit in a kept row always makes that row's loss NaN (it enters the row's sum of
    exponentials), so checking N values replaces re-reading the [N, V] inputs; still one host
    sync. On failure the inputs are scanned to name the culprit (the error path may be slow).
    """
    bad = torch.stack([torch.isnan(loss_N).any(), (~(tau_t > 0)).any(), (~(tau_s > 0)).any()])
    if not bool(bad.any()):
        return
    check_finite_inputs(named, tau_t, tau_s)
    rows = torch.nonzero(torch.isnan(loss_N)).flatten()[:8].tolist()
    raise ValueError(f"kd_loss: NaN loss in rows {rows} (+inf logits, or fp16 logits overflowing?)")


def checked_compute(compute, check_nan: bool, backend: str, named, tau_t, tau_s):
    """Run `compute()` -> (loss_N, ...) under the NaN policy of `backend` (see kd_loss's docs)."""
    if check_nan and backend != "triton":
        check_finite_inputs(named, tau_t, tau_s)
    out = compute()
    if check_nan and backend == "triton":
        check_loss_rows(out[0], named, tau_t, tau_s)
    return out


@torch.library.custom_op("padd::kd_loss", mutates_args=())
def kd_loss_op(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau_t: torch.Tensor,
    tau_s: torch.Tensor,
    weight: torch.Tensor,
    divergence: str,
    beta: float,
    compute_grad: bool,
    check_nan: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted per-row loss `[N]` fp32 and d(sum loss)/d student_logits (`[0]` if not needed)."""
    args = (student_logits, teacher_logits, tau_t, tau_s, weight, divergence, beta, compute_grad)
    if backend == "triton":
        from .triton import kd_loss_triton as compute
    else:
        compute = kd_loss_and_grad_reference
    named = {"student_logits": student_logits, "teacher_logits": teacher_logits}
    loss_N, grad_NV = checked_compute(lambda: compute(*args), check_nan, backend, named, tau_t, tau_s)
    if grad_NV is None:
        grad_NV = student_logits.new_empty(0)
    return loss_N, grad_NV


class KdLossCPU(torch.autograd.Function):
    """`padd::kd_loss` on the reference backend as a plain `autograd.Function`: the same
    functions, NaN policy and in-place backward, without the custom op's dispatch (~0.2 ms a
    call on CPU, as much as the loss at small N x V). `tau_t` / `tau_s` may be floats (the
    op's stride-0 rows, unbuilt: `kd_loss` checked them). `kd_loss` takes it for eager CPU calls
    (`_dispatch.cpu_eager`); torch.compile, dispatch modes and other devices keep the op.
    Returns the weighted per-row loss `[N]`, or its sum with `reduce` (one autograd node less)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, tau_t, tau_s, weight, divergence, beta, compute_grad,
                check_nan, reduce=False):  # fmt: skip
        args = (student_logits, teacher_logits, tau_t, tau_s, weight, divergence, beta, compute_grad)
        named = {"student_logits": student_logits, "teacher_logits": teacher_logits}
        compute = lambda: kd_loss_and_grad_reference(*args)
        loss_N, grad_NV = checked_compute(compute, check_nan, "reference", named, tau_t, tau_s)
        ctx.compute_grad = compute_grad
        if compute_grad:
            ctx.save_for_backward(grad_NV)
        return loss_N.sum() if reduce else loss_N

    @staticmethod
    def backward(ctx, grad_loss_N):
        if not ctx.compute_grad:
            raise RuntimeError("kd_loss: the forward ran without a student gradient (student had no grad)")
        _refuse_second_backward(ctx)
        (grad_NV,) = ctx.saved_tensors
        if grad_loss_N.dim() == 0:  # reduced: one read of the upstream gradient, no [N] ops
            if grad_loss_N.item() != 1.0:
                grad_NV.mul_(grad_loss_N.to(grad_NV.dtype))  # as scale_rows_reference_ does
        else:
            scale_rows_reference_(grad_NV, grad_loss_N)
        return (grad_NV,) + (None,) * 9


@kd_loss_op.register_fake
def _(
    student_logits, teacher_logits, tau_t, tau_s, weight, divergence, beta, compute_grad, check_nan, backend
):
    loss_N = student_logits.new_empty(student_logits.shape[0], dtype=torch.float32)
    grad_NV = torch.empty_like(student_logits) if compute_grad else student_logits.new_empty(0)
    return loss_N, grad_NV


@torch.library.custom_op("padd::kd_scale_rows_", mutates_args=("grad",))
def kd_scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """`grad[i, :] *= grad_output[i]` in place (`grad_output` `[N]`, possibly stride 0)."""
    if backend == "triton":
        from .triton import scale_rows_triton_

        scale_rows_triton_(grad, grad_output)
    else:
        scale_rows_reference_(grad, grad_output)


@kd_scale_rows_.register_fake
def _(grad, grad_output, backend):
    return None


def _kd_setup_context(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.compute_grad = inputs[7]
    ctx.save_for_backward(output[1])


def _refuse_second_backward(ctx) -> None:
    """The saved gradients are scaled in place, so a second backward would scale them twice."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            "kd_loss: backward ran twice through one graph (retain_graph=True is not supported)"
        )
    ctx.consumed = True


def _kd_backward(ctx, grad_loss_N, _grad_of_grad):
    if not ctx.compute_grad:
        raise RuntimeError("kd_loss: the forward ran without a student gradient (student had no grad)")
    _refuse_second_backward(ctx)
    (grad_NV,) = ctx.saved_tensors
    torch.ops.padd.kd_scale_rows_(grad_NV, grad_loss_N, ctx.backend)
    return (grad_NV,) + (None,) * 9


kd_loss_op.register_autograd(_kd_backward, setup_context=_kd_setup_context)


def fused_linear_kd_loss_impl(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    student_head_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_head_weight: torch.Tensor | None,
    teacher_head_bias: torch.Tensor | None,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    tau_t: torch.Tensor,
    tau_s: torch.Tensor,
    weight: torch.Tensor,
    divergence: str,
    beta: float,
    chunk_size: int,
    compute_grad: bool,
    check_nan: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss `[N]` and the grads of hidden, head weight, bias (`[0]` where absent): the
    implementation of `padd::fused_linear_kd_loss` (and of `FusedLinearKdLossCPU`)."""
    teacher = dict(
        teacher_logits=teacher_logits,
        teacher_hidden=teacher_hidden,
        teacher_head_weight=teacher_head_weight,
        teacher_head_bias=teacher_head_bias,
        teacher_ids=teacher_ids,
        teacher_logprobs=teacher_logprobs,
    )
    named = dict(student_hidden=student_hidden, student_head_weight=student_head_weight,
                 student_head_bias=student_head_bias, **teacher)  # fmt: skip
    named.pop("teacher_ids")

    def compute():
        return fused_linear_kd_forward(
            student_hidden, student_head_weight, student_head_bias, tau_t_N=tau_t, tau_s_N=tau_s,
            w_N=weight, divergence=divergence, beta=beta, chunk_size=chunk_size, compute_grad=compute_grad,
            backend=backend, **teacher,
        )  # fmt: skip

    loss_N, grad_h, grad_w, grad_b = checked_compute(compute, check_nan, backend, named, tau_t, tau_s)
    # Distinct empty tensors: a custom op's outputs may not alias each other.
    return loss_N, *(g if g is not None else student_hidden.new_empty(0) for g in (grad_h, grad_w, grad_b))


@torch.library.custom_op("padd::fused_linear_kd_loss", mutates_args=())
def fused_linear_kd_loss_op(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    student_head_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_head_weight: torch.Tensor | None,
    teacher_head_bias: torch.Tensor | None,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    tau_t: torch.Tensor,
    tau_s: torch.Tensor,
    weight: torch.Tensor,
    divergence: str,
    beta: float,
    chunk_size: int,
    compute_grad: bool,
    check_nan: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss `[N]` and the grads of hidden, head weight, bias (`[0]` where absent)."""
    return fused_linear_kd_loss_impl(
        student_hidden, student_head_weight, student_head_bias, teacher_logits, teacher_hidden,
        teacher_head_weight, teacher_head_bias, teacher_ids, teacher_logprobs, tau_t, tau_s, weight,
        divergence, beta, chunk_size, compute_grad, check_nan, backend,
    )  # fmt: skip


@fused_linear_kd_loss_op.register_fake
def _(student_hidden, student_head_weight, student_head_bias, *args):
    compute_grad = args[-3]
    loss_N = student_hidden.new_empty(student_hidden.shape[0], dtype=torch.float32)
    empty = lambda: student_hidden.new_empty(0)
    if not compute_grad:
        return loss_N, empty(), empty(), empty()
    grad_b = empty() if student_head_bias is None else torch.empty_like(student_head_bias)
    return loss_N, torch.empty_like(student_hidden), torch.empty_like(student_head_weight), grad_b


# Positions of the arguments of padd::fused_linear_kd_loss used by its backward.
_FL_WEIGHT, _FL_COMPUTE_GRAD, _FL_N_ARGS = 11, 15, 18


def _fl_setup_context(ctx, inputs, output):
    ctx.per_row = not inputs[_FL_COMPUTE_GRAD]  # reduction="none": grads need grad_output per row
    # Non-tensor arguments are kept as they are; tensors go through save_for_backward.
    ctx.arg_template = [None if isinstance(x, torch.Tensor) else x for x in inputs]
    ctx.is_tensor = [isinstance(x, torch.Tensor) for x in inputs]
    ctx.has_bias = inputs[2] is not None
    if ctx.per_row:
        ctx.save_for_backward(*(x for x in inputs if isinstance(x, torch.Tensor)))
    else:
        ctx.save_for_backward(*output[1:])


def _fl_backward(ctx, grad_loss_N, *_unused):
    if ctx.per_row:
        grads = _fl_recompute_grads(ctx, grad_loss_N)
    else:
        # Scalar reductions: grad_loss_N is one value broadcast over the rows.
        _refuse_second_backward(ctx)
        go = grad_loss_N.reshape(-1)[:1].sum()  # a 0-d tensor, also for N = 0 (zero grads then)
        grads = tuple(g.mul_(go.to(g.dtype)) for g in ctx.saved_tensors)
    grad_b = grads[2] if ctx.has_bias else None
    return (grads[0], grads[1], grad_b) + (None,) * (_FL_N_ARGS - 3)


def _fl_recompute_grads(ctx, grad_loss_N):
    """reduction="none": re-run the chunked pass with the per-row upstream gradient folded in."""
    saved = iter(ctx.saved_tensors)
    args = [next(saved) if is_t else x for x, is_t in zip(ctx.arg_template, ctx.is_tensor, strict=True)]
    args[_FL_WEIGHT] = args[_FL_WEIGHT] * grad_loss_N.float()
    args[_FL_COMPUTE_GRAD] = True
    args[_FL_COMPUTE_GRAD + 1] = False  # inputs were already checked for NaN
    _, grad_h, grad_w, grad_b = torch.ops.padd.fused_linear_kd_loss(*args)
    return grad_h, grad_w, grad_b


fused_linear_kd_loss_op.register_autograd(_fl_backward, setup_context=_fl_setup_context)


class FusedLinearKdLossCPU(torch.autograd.Function):
    """`padd::fused_linear_kd_loss` on the reference backend as a plain `autograd.Function`
    (same implementation, context and backward; see `KdLossCPU`). Takes the op's arguments and
    returns the per-row loss `[N]`."""

    @staticmethod
    def forward(ctx, *inputs):
        output = fused_linear_kd_loss_impl(*inputs)
        _fl_setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss_N):
        return _fl_backward(ctx, grad_loss_N)


@register_flop_formula(torch.ops.padd.fused_linear_kd_loss)
def _fused_linear_kd_flops(
    student_hidden,
    student_head_weight,
    student_head_bias,
    teacher_logits,
    teacher_hidden,
    teacher_head_weight,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    """GEMM FLOPs: student logits (2NVHs), teacher logits if from hidden (2NVHt) and, when the
    forward computes the gradients, dL/dh and dL/dW (2 x 2NVHs)."""
    n_rows, hs = student_hidden
    vocab = student_head_weight[0]
    compute_grad = args[-3]
    flops = 2 * n_rows * vocab * hs * (3 if compute_grad else 1)
    if teacher_hidden is not None:
        flops += 2 * n_rows * vocab * teacher_hidden[1]
    return flops
