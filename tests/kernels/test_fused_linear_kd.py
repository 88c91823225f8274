"""fused_linear_kd_loss: chunked LM head + KD loss vs the unfused reference, memory, compile, errors.

Shape legend: N token rows, V vocabulary, Hs / Ht student / teacher hidden size, K sparse
teacher support.
"""

from __future__ import annotations

import pytest
import torch
from padd.kernels import SparseTeacher, TeacherHead, fused_linear_kd_loss
from padd.kernels.kd_loss import fused_linear_kd_loss_reference
from padd.kernels.kd_loss.fused_linear import fused_linear_kd_forward
from padd.kernels.kd_loss.reference import DIVERGENCES, REDUCTIONS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

# The interpreter evaluates both sides of `tl.where` in numpy, which warns on the guarded
# inf - inf / log(0) lanes; those lanes are discarded.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
)

TEACHER_KINDS = ("logits", "head", "sparse")
# (atol, rtol) of loss and of the hidden / weight / bias gradients, per dtype.
TOL = {
    torch.float32: {"loss": (1e-5, 1e-5), "grad": (1e-5, 1e-4)},
    torch.float16: {"loss": (2e-3, 2e-3), "grad": (2e-3, 2e-2)},
    torch.bfloat16: {"loss": (2e-2, 2e-2), "grad": (2e-2, 5e-2)},
}


def make_problem(n_rows, vocab, kind, *, hs=8, ht=5, k=4, dtype=torch.float32, bias=True, device=None):
    """Student (hidden, head, bias) requiring grad, and the teacher."""
    opts = dict(device=device, dtype=dtype)
    hidden_NH = torch.randn(n_rows, hs, **opts).requires_grad_()
    weight_VH = (torch.randn(vocab, hs, **opts) / hs**0.5).requires_grad_()
    bias_V = torch.randn(vocab, **opts).requires_grad_() if bias else None
    if kind == "logits":
        logits_NV = 2 * torch.randn(n_rows, vocab, **opts)
        return (hidden_NH, weight_VH, bias_V), logits_NV
    if kind == "head":
        t_hidden_NH, t_weight_VH = torch.randn(n_rows, ht, **opts), torch.randn(vocab, ht, **opts)
        teacher = TeacherHead(t_hidden_NH, t_weight_VH)
        return (hidden_NH, weight_VH, bias_V), teacher
    ids_NK = torch.stack([torch.randperm(vocab, device=device)[:k] for _ in range(n_rows)])
    logprobs_NK = torch.log_softmax(2 * torch.randn(n_rows, k, **opts).float(), -1).to(dtype) - 0.1
    teacher = SparseTeacher(ids_NK, logprobs_NK)
    return (hidden_NH, weight_VH, bias_V), teacher


def loss_kwargs(n_rows, divergence, reduction, device=None):
    mask_N = torch.ones(n_rows, dtype=torch.bool, device=device)
    mask_N[1] = False
    tau_N = 0.5 + 1.5 * torch.rand(n_rows, device=device)
    return dict(divergence=divergence, reduction=reduction, temperature=tau_N, mask=mask_N, beta=0.3)


def run_both(student, teacher, kwargs, *, backend, chunk_size):
    """(loss, grads) of the fused op and of the unfused reference, with one random upstream grad."""
    params = [p for p in student if p is not None]
    fused = fused_linear_kd_loss(
        student[0],
        student[1],
        teacher,
        student_head_bias=student[2],
        backend=backend,
        chunk_size=chunk_size,
        **kwargs,
    )
    go = torch.randn_like(fused) if fused.dim() else torch.tensor(0.7, device=fused.device)
    fused_grads = torch.autograd.grad(fused, params, go)
    ref = fused_linear_kd_loss_reference(
        student[0], student[1], teacher, student_head_bias=student[2], **kwargs
    )
    ref_grads = torch.autograd.grad(ref, params, go)
    return (fused.detach(), fused_grads), (ref.detach(), ref_grads)


def assert_matches(fused, ref, dtype):
    (loss, grads), (ref_loss, ref_grads) = fused, ref
    atol, rtol = TOL[dtype]["loss"]
    torch.testing.assert_close(loss.float(), ref_loss.float(), atol=atol, rtol=rtol)
    atol, rtol = TOL[dtype]["grad"]
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        assert got.dtype == want.dtype
        torch.testing.assert_close(
            got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )


def _divergences_for(kind):
    return [d for d in DIVERGENCES if not (kind == "sparse" and d == "reverse_kl")]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_reference_backend_matches_unfused(kind, reduction):
    for divergence in _divergences_for(kind):
        student, teacher = make_problem(10, 13, kind)
        kwargs = loss_kwargs(10, divergence, reduction)
        fused, ref = run_both(student, teacher, kwargs, backend="reference", chunk_size=3)
        assert_matches(fused, ref, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_triton_backend_matches_unfused(kind, divergence, reduction):
    student, teacher = make_problem(5, 37, kind, hs=6, ht=9)
    kwargs = loss_kwargs(5, divergence, reduction)
    fused, ref = run_both(student, teacher, kwargs, backend="triton", chunk_size=2)
    assert_matches(fused, ref, torch.float32)


def test_triton_backend_fp16_without_bias():
    student, teacher = make_problem(4, 29, "head", dtype=torch.float16, bias=False)
    kwargs = loss_kwargs(4, "reverse_kl", "sum")
    fused, ref = run_both(student, teacher, kwargs, backend="triton", chunk_size=3)
    assert_matches(fused, ref, torch.float16)


def test_empty_batch():
    (h, w, b), logits = make_problem(0, 9, "logits")
    loss = fused_linear_kd_loss(h, w, logits, student_head_bias=b)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 8) and torch.all(w.grad == 0)


def test_chunk_size_does_not_change_the_result():
    student, teacher = make_problem(9, 17, "logits")
    losses = [fused_linear_kd_loss(student[0], student[1], teacher, chunk_size=c) for c in (1, 4, 9, 100)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0])


def test_sparse_teacher_is_renormalised_over_its_support():
    """A sparse teacher == dense teacher logits that are -inf off the support (any log-prob shift)."""
    student, teacher = make_problem(6, 11, "sparse")
    dense_NV = torch.full((6, 11), float("-inf")).scatter_(1, teacher.ids, teacher.logprobs + 3.0)
    for divergence in ("forward_kl", "jsd"):
        sparse = fused_linear_kd_loss(student[0], student[1], teacher, divergence=divergence)
        dense = fused_linear_kd_loss(student[0], student[1], dense_NV, divergence=divergence)
        torch.testing.assert_close(sparse, dense)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in elements) produced by any op while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_allocation(fn, n_rows, vocab, chunk):
    student, teacher = make_problem(n_rows, vocab, "head", hs=8, ht=6)
    with _LargestAllocation() as mode:
        fn(student, teacher, chunk)
    return mode.largest


def _fused_forward(student, teacher, chunk):
    """The custom op's own implementation, called directly: a dispatch mode does not see
    inside a custom op (it handles the op as one call), so the chunk loop is run here."""
    n_rows = student[0].shape[0]
    ones_N = torch.ones(n_rows)
    return fused_linear_kd_forward(
        *(p.detach() for p in student), tau_t_N=ones_N, tau_s_N=ones_N, w_N=ones_N / n_rows,
        divergence="jsd", beta=0.5, chunk_size=chunk, compute_grad=True, backend="reference",
        teacher_logits=None, teacher_hidden=teacher.hidden, teacher_head_weight=teacher.weight,
        teacher_head_bias=None, teacher_ids=None, teacher_logprobs=None,
    )  # fmt: skip


def _public_fwd_bwd(student, teacher, chunk):
    fused_linear_kd_loss(
        student[0], student[1], teacher, student_head_bias=student[2], chunk_size=chunk
    ).backward()


def _unfused_fwd_bwd(student, teacher, chunk):
    fused_linear_kd_loss_reference(student[0], student[1], teacher, student_head_bias=student[2]).backward()


def test_peak_allocation_does_not_grow_with_n():
    vocab, chunk, hs = 301, 16, 8
    small, large = (_largest_allocation(_fused_forward, n, vocab, chunk) for n in (64, 256))
    # The largest tensors of the chunk loop are the [chunk, V] logits and their fp32 math.
    assert small == large == chunk * vocab
    # Around the op: only N x H, V x H and [N] tensors.
    small, large = (_largest_allocation(_public_fwd_bwd, n, vocab, chunk) for n in (64, 256))
    assert small == large == vocab * hs
    # The measurement does see [N, V] tensors when they exist: the unfused reference makes them.
    assert _largest_allocation(_unfused_fwd_bwd, 256, vocab, chunk) >= 256 * vocab


def test_flop_counter_counts_the_gemms():
    student, teacher = make_problem(12, 40, "head", hs=8, ht=5)
    with FlopCounterMode(display=False) as counter:
        fused_linear_kd_loss(student[0], student[1], teacher, chunk_size=5).backward()
    assert counter.get_total_flops() == 2 * 12 * 40 * 8 * 3 + 2 * 12 * 40 * 5


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_cpu(reduction):
    student, teacher = make_problem(7, 19, "sparse")

    def loss_fn(h, w, b, ids, logprobs):
        teacher = SparseTeacher(ids, logprobs)
        return fused_linear_kd_loss(h, w, teacher, student_head_bias=b, divergence="jsd", reduction=reduction,
                                    chunk_size=3)  # fmt: skip

    # aot_eager traces the ops, fakes and registered autograd exactly as inductor would, faster.
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(*student, *teacher)
    go = torch.randn_like(got) if got.dim() else torch.tensor(1.3)
    got_grads = torch.autograd.grad(got, student, go)
    want = loss_fn(*student, *teacher)
    want_grads = torch.autograd.grad(want, student, go)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_invalid_inputs_raise():
    (h, w, b), logits = make_problem(4, 9, "logits")
    with pytest.raises(ValueError, match="teacher logits requires grad"):
        fused_linear_kd_loss(h, w, logits.clone().requires_grad_())
    with pytest.raises(ValueError, match="TeacherHead.weight requires grad"):
        fused_linear_kd_loss(h, w, TeacherHead(torch.randn(4, 3), torch.randn(9, 3, requires_grad=True)))
    with pytest.raises(ValueError, match="teacher logits must have shape"):
        fused_linear_kd_loss(h, w, logits[:, :8])
    with pytest.raises(ValueError, match="Hs=8 != student_head_weight Hs=7"):
        fused_linear_kd_loss(h, w[:, :7], logits)
    with pytest.raises(TypeError, match="share a float dtype"):
        fused_linear_kd_loss(h, w.double(), logits)
    with pytest.raises(ValueError, match="student_head_bias must be"):
        fused_linear_kd_loss(h, w, logits, student_head_bias=torch.zeros(8))
    with pytest.raises(ValueError, match="reverse_kl is infinite with a SparseTeacher"):
        sparse = SparseTeacher(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2))
        fused_linear_kd_loss(h, w, sparse, divergence="reverse_kl")
    with pytest.raises(ValueError, match="SparseTeacher.ids must be integer"):
        fused_linear_kd_loss(h, w, SparseTeacher(torch.zeros(4, 2), torch.zeros(4, 2)))
    with pytest.raises(TypeError, match="teacher must be"):
        fused_linear_kd_loss(h, w, [logits])
    with pytest.raises(ValueError, match="NaN in student_hidden"):
        fused_linear_kd_loss(h.detach().clone().fill_(float("nan")), w, logits)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_linear_kd_loss(h, w, logits, chunk_size=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_gpu_matches_unfused(kind, dtype):
    student, teacher = make_problem(300, 32000 + 7, kind, hs=64, ht=48, k=20, dtype=dtype, device="cuda")
    kwargs = loss_kwargs(300, "jsd" if kind == "sparse" else "forward_kl", "mean", device="cuda")
    fused, ref = run_both(student, teacher, kwargs, backend="triton", chunk_size=128)
    assert_matches(fused, ref, dtype)


@pytest.mark.gpu
def test_gpu_peak_memory_independent_of_n():
    def peak(n_rows):
        student, teacher = make_problem(
            n_rows, 32000, "head", hs=256, ht=256, dtype=torch.bfloat16, device="cuda"
        )
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fused_linear_kd_loss(student[0], student[1], teacher, chunk_size=256).backward()
        torch.cuda.synchronize()
        # Minus the N-sized outputs (hidden grad) so only the working set is compared.
        return torch.cuda.max_memory_allocated() - base - n_rows * 256 * 2

    peak(1024)  # one-time allocations (cuBLAS workspace, Triton) land here, not in the comparison
    assert peak(4096) <= 1.1 * peak(1024)
