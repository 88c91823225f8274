"""kd_loss: reference vs independent oracles, Triton (interpreter) vs reference, edges and errors.

Shape legend: N token rows, V vocabulary. `ref` = the PyTorch reference, `tri` = the kernel.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from offline_compile import assert_compiles_offline_for_sm90
from padd.kernels import kd_loss, kd_loss_reference
from padd.kernels.kd_loss.reference import DIVERGENCES, REDUCTIONS

# (atol, rtol) of the loss and of the student-logit gradient, per input dtype. Both sides do
# fp32 math on the same inputs; the gradient is rounded once to the input dtype.
# The interpreter evaluates both sides of `tl.where` in numpy, which warns on the guarded
# inf - inf / log(0) lanes; those lanes are discarded.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
)

TOL = {
    torch.float32: {"loss": (1e-5, 1e-5), "grad": (1e-6, 1e-4)},
    torch.float16: {"loss": (1e-4, 1e-4), "grad": (2e-5, 2e-3)},
    torch.bfloat16: {"loss": (1e-3, 1e-3), "grad": (2e-4, 2e-2)},
}


def make_inputs(
    n_rows: int, vocab: int, dtype=torch.float32, *, per_row_tau=False, masked=False, device=None
):
    """Student logits (requires grad), teacher logits, teacher temperature and mask."""
    student_NV = (3 * torch.randn(n_rows, vocab, device=device)).to(dtype).requires_grad_()
    teacher_NV = (3 * torch.randn(n_rows, vocab, device=device)).to(dtype)
    tau = (0.5 + 1.5 * torch.rand(n_rows, device=device)) if per_row_tau else 1.7
    mask_N = None
    if masked:
        mask_N = torch.rand(n_rows, device=device) > 0.4
        mask_N[0] = True
        if n_rows > 1:
            mask_N[1] = False
    return student_NV, teacher_NV, tau, mask_N


def upstream_like(loss: torch.Tensor) -> torch.Tensor:
    """A random upstream gradient (not ones), so that the backward scaling is exercised."""
    return torch.randn_like(loss) if loss.dim() else torch.tensor(0.37, device=loss.device)


def loss_and_grad(fn, student_NV, *args, go=None, **kwargs):
    loss = fn(student_NV, *args, **kwargs)
    go = upstream_like(loss) if go is None else go
    (grad_NV,) = torch.autograd.grad(loss, student_NV, go)
    return loss.detach(), grad_NV, go


def assert_close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


# ---------------------------------------------------------------- reference vs oracles (cheap)


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_reference_forward_reverse_kl_match_torch_kl_div(reduction, tau):
    s_NV, t_NV = torch.randn(9, 31), torch.randn(9, 31)
    log_q_NV, log_p_NV = torch.log_softmax(s_NV, -1), torch.log_softmax(t_NV / tau, -1)
    red = "none" if reduction == "none" else reduction
    fwd = F.kl_div(log_q_NV, log_p_NV, log_target=True, reduction=red)
    rev = F.kl_div(log_p_NV, log_q_NV, log_target=True, reduction=red)
    if reduction == "none":
        fwd, rev = fwd.sum(-1), rev.sum(-1)
    kwargs = dict(temperature=tau, reduction=reduction)
    torch.testing.assert_close(kd_loss_reference(s_NV, t_NV, divergence="forward_kl", **kwargs), fwd)
    torch.testing.assert_close(kd_loss_reference(s_NV, t_NV, divergence="reverse_kl", **kwargs), rev)


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 1.0])
def test_reference_mixtures_match_probability_space_oracle(beta):
    s_NV, t_NV = torch.randn(7, 23), torch.randn(7, 23)
    q_NV, p_NV = torch.softmax(s_NV, -1), torch.softmax(t_NV, -1)
    kl = lambda x, y: F.kl_div(y.log(), x, reduction="none").sum(-1)  # KL(x || y)
    m_NV = beta * p_NV + (1 - beta) * q_NV
    expected = {
        "jsd": beta * kl(p_NV, m_NV) + (1 - beta) * kl(q_NV, m_NV),
        "skew_forward_kl": kl(p_NV, m_NV),
        "skew_reverse_kl": kl(q_NV, beta * q_NV + (1 - beta) * p_NV),
    }
    for divergence, want in expected.items():
        got = kd_loss_reference(s_NV, t_NV, divergence=divergence, beta=beta, reduction="none")
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_reference_skews_reduce_to_kl_at_beta_zero():
    s_NV, t_NV = torch.randn(5, 17), torch.randn(5, 17)
    for skew, plain in (("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        got = kd_loss_reference(s_NV, t_NV, divergence=skew, beta=0.0, reduction="none")
        torch.testing.assert_close(got, kd_loss_reference(s_NV, t_NV, divergence=plain, reduction="none"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hand_computed_two_tokens_three_words(backend):
    # q = [1/3, 1/3, 1/3], [1/4, 1/2, 1/4];  p = [1/2, 1/4, 1/4], [1/3, 1/3, 1/3]
    student_NV = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2), 0.0]], requires_grad=True)
    teacher_NV = torch.tensor([[math.log(2), 0.0, 0.0], [5.0, 5.0, 5.0]])
    fwd_rows = [0.5 * math.log(1.125), math.log(32 / 27) / 3]
    rev_rows = [math.log(32 / 27) / 3, 0.5 * math.log(1.125)]
    for divergence, rows in (("forward_kl", fwd_rows), ("reverse_kl", rev_rows)):
        got = kd_loss(student_NV, teacher_NV, divergence=divergence, reduction="none", backend=backend)
        torch.testing.assert_close(got.detach(), torch.tensor(rows), atol=1e-6, rtol=1e-6)
    loss = kd_loss(student_NV, teacher_NV, reduction="mean", backend=backend)
    (grad_NV,) = torch.autograd.grad(loss, student_NV)
    q_NV = torch.tensor([[1 / 3] * 3, [0.25, 0.5, 0.25]])
    p_NV = torch.tensor([[0.5, 0.25, 0.25], [1 / 3] * 3])
    torch.testing.assert_close(loss.detach(), torch.tensor(sum(fwd_rows) / 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_NV, (q_NV - p_NV) / 2, atol=1e-6, rtol=1e-6)  # d KL(p||q)/dz = q - p


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_closed_form_grad_matches_autograd(divergence, reduction):
    """The reference backend's closed-form gradient (the kernel's formulas) vs autograd."""
    s_NV, t_NV, tau_N, mask_N = make_inputs(6, 29, per_row_tau=True, masked=True)
    kwargs = dict(divergence=divergence, temperature=tau_N, mask=mask_N, reduction=reduction, beta=0.3)
    kwargs.update(student_temperature=1.3, temperature_scaling=True)
    got, grad, go = loss_and_grad(kd_loss, s_NV, t_NV, backend="reference", **kwargs)
    want, want_grad, _ = loss_and_grad(kd_loss_reference, s_NV, t_NV, go=go, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, atol=1e-7, rtol=1e-5)


def test_reduction_and_mask_semantics():
    s_NV, t_NV, _, _ = make_inputs(6, 13)
    mask_N = torch.tensor([1, 0, 1, 1, 0, 0])
    rows_N = kd_loss_reference(s_NV, t_NV, reduction="none")
    kept = mask_N.bool()
    got = {r: kd_loss(s_NV, t_NV, mask=mask_N, reduction=r, backend="reference") for r in REDUCTIONS}
    torch.testing.assert_close(got["none"], torch.where(kept, rows_N, 0))
    torch.testing.assert_close(got["sum"], rows_N[kept].sum())
    torch.testing.assert_close(got["mean"], rows_N[kept].mean())
    torch.testing.assert_close(got["batchmean"], rows_N[kept].sum() / 6)
    labels_N = torch.where(kept, 3, -100)
    torch.testing.assert_close(kd_loss(s_NV, t_NV, labels=labels_N, backend="reference"), got["mean"])
    none_kept = kd_loss(s_NV, t_NV, mask=torch.zeros(6), backend="reference")
    assert none_kept.item() == 0.0


def test_reference_drops_rows_by_labels_like_kd_loss():
    """`kd_loss_reference` takes `labels` / `ignore_index` as `kd_loss` does, with `mask` too."""
    s_NV, t_NV, _, _ = make_inputs(6, 13)
    mask_N = torch.tensor([1, 0, 1, 1, 0, 1])
    labels_N = torch.tensor([3, 3, -1, 5, 5, 5])
    for reduction in REDUCTIONS:
        kwargs = dict(mask=mask_N, labels=labels_N, ignore_index=-1, reduction=reduction)
        want = kd_loss(s_NV, t_NV, backend="reference", **kwargs)
        torch.testing.assert_close(kd_loss_reference(s_NV, t_NV, **kwargs), want)


def test_temperature_scaling_is_tau_squared():
    s_NV, t_NV, _, _ = make_inputs(4, 11)
    plain = kd_loss(s_NV, t_NV, temperature=3.0, backend="reference")
    scaled = kd_loss(s_NV, t_NV, temperature=3.0, temperature_scaling=True, backend="reference")
    torch.testing.assert_close(scaled, 9.0 * plain)


# ---------------------------------------------------------------- Triton (interpreter) vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("per_row_tau", [False, True], ids=["tau", "tauN"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_matches_reference(divergence, per_row_tau, masked, reduction, dtype):
    # 3 rows (the interpreter runs one Python program per row); with a mask, row 1 is dropped.
    s_NV, t_NV, tau, mask_N = make_inputs(3, 37, dtype, per_row_tau=per_row_tau, masked=masked)
    kwargs = dict(divergence=divergence, temperature=tau, mask=mask_N, reduction=reduction, beta=0.3)
    tri, tri_grad, go = loss_and_grad(kd_loss, s_NV, t_NV, backend="triton", **kwargs)
    ref, ref_grad, _ = loss_and_grad(kd_loss_reference, s_NV, t_NV, go=go, **kwargs)
    assert tri_grad.dtype == dtype
    assert_close(tri, ref, TOL[dtype]["loss"], "loss")
    assert_close(tri_grad, ref_grad, TOL[dtype]["grad"], "grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_student_temperature_and_t2(divergence):
    s_NV, t_NV, tau_N, _ = make_inputs(3, 21, per_row_tau=True)
    kwargs = dict(divergence=divergence, temperature=tau_N, student_temperature=tau_N.flip(0), beta=0.7)
    kwargs["temperature_scaling"] = True
    tri, tri_grad, go = loss_and_grad(kd_loss, s_NV, t_NV, backend="triton", **kwargs)
    ref, ref_grad, _ = loss_and_grad(kd_loss_reference, s_NV, t_NV, go=go, **kwargs)
    assert_close(tri, ref, TOL[torch.float32]["loss"], "loss")
    assert_close(tri_grad, ref_grad, TOL[torch.float32]["grad"], "grad")


@pytest.mark.parametrize(
    ("vocab", "block_v"),
    [(7, None), (1, None), (130, 64), (1013, 256), (2 * 1024 + 3, None)],
    ids=["V7", "V1", "V130-b64", "V1013-b256", "V2051-default"],
)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_triton_odd_vocab_and_multi_block(vocab, block_v, divergence):
    from padd.kernels.kd_loss.reference import kd_loss_and_grad_reference
    from padd.kernels.kd_loss.triton import kd_loss_triton

    s_NV, t_NV, tau_N, _ = make_inputs(3, vocab, per_row_tau=True)
    s_NV = s_NV.detach()
    w_N, tau_s_N = torch.tensor([0.5, 0.0, 2.0]), torch.ones(3)
    grad_NV = torch.full_like(s_NV, float("nan"))  # an unwritten element would stay NaN
    args = (s_NV, t_NV, tau_N, tau_s_N, w_N, divergence, 0.4, True)
    loss_N, _ = kd_loss_triton(*args, grad_out_NV=grad_NV, block_v=block_v)
    ref_loss_N, ref_grad_NV = kd_loss_and_grad_reference(*args)
    assert_close(loss_N, ref_loss_N, TOL[torch.float32]["loss"], "loss")
    assert_close(grad_NV, ref_grad_NV, TOL[torch.float32]["grad"], "grad")
    assert torch.all(grad_NV[1] == 0)  # weight-0 (masked) row: zero gradient, written


def test_triton_persistent_grid_matches_one_row_per_program():
    from padd.kernels.kd_loss.triton import kd_loss_triton

    s_NV, t_NV, tau_N, _ = make_inputs(5, 40, per_row_tau=True)
    args = (
        s_NV.detach(),
        t_NV,
        tau_N,
        torch.ones(5),
        torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0]),
        "reverse_kl",
        0.5,
        True,
    )
    loss_N, grad_NV = kd_loss_triton(*args)
    loss2_N, grad2_NV = kd_loss_triton(*args, num_programs=2)  # rows 0, 2, 4 and 1, 3
    torch.testing.assert_close(loss2_N, loss_N, atol=0, rtol=0)
    torch.testing.assert_close(grad2_NV, grad_NV, atol=0, rtol=0)


def test_triton_gradient_can_overwrite_the_logits_in_place():
    from padd.kernels.kd_loss.reference import kd_loss_and_grad_reference
    from padd.kernels.kd_loss.triton import kd_loss_triton

    s_NV, t_NV, _, _ = make_inputs(3, 300)
    s_NV = s_NV.detach()
    ones = torch.ones(3)
    _, ref_grad = kd_loss_and_grad_reference(s_NV, t_NV, ones, ones, ones, "jsd", 0.5, True)
    buf_NV = s_NV.clone()
    kd_loss_triton(buf_NV, t_NV, ones, ones, ones, "jsd", 0.5, True, grad_out_NV=buf_NV, block_v=128)
    assert_close(buf_NV, ref_grad, TOL[torch.float32]["grad"], "in-place grad")


def test_triton_scale_rows_skips_unit_rows():
    from padd.kernels.kd_loss.triton import scale_rows_triton_

    g_NV = torch.randn(3, 50)
    want = g_NV * torch.tensor([[1.0], [2.5], [0.0]])
    scale_rows_triton_(g_NV, torch.tensor([1.0, 2.5, 0.0]), block_v=16)
    torch.testing.assert_close(g_NV, want)


def test_second_backward_through_one_graph_is_refused():
    s_NV, t_NV, _, _ = make_inputs(3, 9)
    loss = kd_loss(s_NV, t_NV, backend="reference")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True is not supported"):
        loss.backward()


def test_no_grad_student_gives_loss_only():
    s_NV, t_NV, _, _ = make_inputs(3, 19)
    for backend in ("reference", "triton"):
        loss = kd_loss(s_NV.detach(), t_NV, divergence="jsd", backend=backend)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, kd_loss_reference(s_NV.detach(), t_NV, divergence="jsd"))


# ---------------------------------------------------------------- extreme values


def _loss_grad_all_backends(s_NV, t_NV, divergence):
    out = []
    for backend in ("reference", "triton"):
        s = s_NV.clone().requires_grad_()
        loss = kd_loss(s, t_NV, divergence=divergence, backend=backend)
        (grad,) = torch.autograd.grad(loss, s)
        out.append((loss.detach(), grad))
    return out


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_huge_logits_are_finite(divergence):
    s_NV = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, 1e4, 1e4]])
    t_NV = torch.tensor([[-1e4, 1e4, 3.0, 0.0], [1e4, -1e4, -1e4, 1e4]])
    (ref, ref_grad), (tri, tri_grad) = _loss_grad_all_backends(s_NV, t_NV, divergence)
    for x in (ref, ref_grad, tri, tri_grad):
        assert torch.isfinite(x).all()
    torch.testing.assert_close(tri, ref, atol=1e-2, rtol=1e-5)  # |loss| ~ 1e4: fp32 ulp ~ 1e-3
    torch.testing.assert_close(tri_grad, ref_grad, atol=1e-5, rtol=1e-4)


NEG = float("-inf")


@pytest.mark.parametrize(
    ("case", "divergences"),
    [
        ("both", DIVERGENCES),  # the same vocabulary masked in both models
        ("teacher", ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")),
        ("student", ("reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")),
    ],
)
def test_neg_inf_logits_are_finite_where_defined(case, divergences):
    s_NV, t_NV = torch.randn(3, 9), torch.randn(3, 9)
    if case in ("both", "teacher"):
        t_NV[:, 2:5] = NEG
    if case in ("both", "student"):
        s_NV[:, 2:5] = NEG
    for divergence in divergences:
        (ref, ref_grad), (tri, tri_grad) = _loss_grad_all_backends(s_NV, t_NV, divergence)
        for x in (ref, ref_grad, tri, tri_grad):
            assert torch.isfinite(x).all(), (divergence, x)
        torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tri_grad, ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_support_mismatch_is_inf_not_nan(backend):
    s_NV, t_NV = torch.randn(2, 6), torch.randn(2, 6)
    s_NV[0, 1] = NEG  # p > 0 = q at one word: KL(p || q) is infinite
    loss_N = kd_loss(s_NV, t_NV, reduction="none", backend=backend)
    assert loss_N[0].item() == math.inf and torch.isfinite(loss_N[1])
    masked = kd_loss(s_NV, t_NV, mask=torch.tensor([0, 1]), backend=backend)
    assert torch.isfinite(masked)  # a masked infinite row contributes exactly 0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_logits_raise_clear_error(backend, where):
    s_NV, t_NV, _, _ = make_inputs(3, 8)
    bad = s_NV.detach().clone() if where == "student" else t_NV.clone()
    bad[1, 3] = float("nan")
    args = (bad, t_NV) if where == "student" else (s_NV, bad)
    with pytest.raises(ValueError, match=f"NaN in {where}_logits"):
        kd_loss(*args, backend=backend)


def test_nan_unchecked_is_visible_not_silent():
    s_NV, t_NV, _, _ = make_inputs(3, 8)
    t_NV[1, 3] = float("nan")
    assert torch.isnan(kd_loss(s_NV, t_NV, check_nan=False, backend="reference"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(divergence="kl"), ValueError, "divergence must be one of"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(beta=1.5), ValueError, "beta must be"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(temperature=torch.ones(5)), ValueError, r"temperature must be a float or a tensor \[N=4\]"),
        (dict(temperature=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, "temperature <= 0"),
        (dict(student_temperature=-2.0), ValueError, "student_temperature must be > 0"),
        (dict(mask=torch.ones(4, 1)), ValueError, r"mask must be a tensor \[N=4\]"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_invalid_arguments_raise(kwargs, error, match):
    s_NV, t_NV, _, _ = make_inputs(4, 8)
    # Parameters are built at collection time (CPU); on a GPU machine the logits are on CUDA.
    kwargs = {k: v.to(s_NV.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        kd_loss(s_NV, t_NV, **kwargs)


def test_invalid_tensors_raise():
    s_NV, t_NV, _, _ = make_inputs(4, 8)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        kd_loss(s_NV, t_NV.clone().requires_grad_())
    with pytest.raises(ValueError, match="differ"):
        kd_loss(s_NV, t_NV[:, :7])
    with pytest.raises(ValueError, match="2-D"):
        kd_loss(s_NV[0], t_NV[0])
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        kd_loss(s_NV, t_NV.double())


# ---------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph_cpu():
    s_NV, t_NV, tau_N, mask_N = make_inputs(5, 17, per_row_tau=True, masked=True)

    def loss_fn(s, t, tau, mask):
        return kd_loss(s, t, divergence="jsd", temperature=tau, mask=mask, reduction="none")

    compiled = torch.compile(loss_fn, fullgraph=True)
    got, grad, go = loss_and_grad(compiled, s_NV, t_NV, tau_N, mask_N)
    want, want_grad, _ = loss_and_grad(loss_fn, s_NV, t_NV, tau_N, mask_N, go=go)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)


# ---------------------------------------------------------------- real compiler, no GPU

_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from padd.kernels.kd_loss.triton import _kd_loss_fwd_kernel, _scale_rows_kernel

def sig(kernel, types):
    return {n: types.get(n, "constexpr" if n.isupper() else "i64" if "stride" in n else "*fp32")
            for n in kernel.arg_names}

aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 13)}
target = GPUTarget("cuda", 90, 32)
for dtype, divergence in (("bf16", 0), ("fp16", 4)):
    types = {"s_ptr": "*" + dtype, "t_ptr": "*" + dtype, "g_ptr": "*" + dtype, "beta": "fp32"}
    types.update(n_rows="i32", V="i32")
    consts = {"DIVERGENCE": divergence, "COMPUTE_GRAD": True, "BLOCK_V": 4096}
    src = ASTSource(_kd_loss_fwd_kernel, sig(_kd_loss_fwd_kernel, types), constexprs=consts, attrs=aligned)
    kernel = triton.compile(src, target=target, options={"num_warps": 8})
    assert "ld.global.v4" in kernel.asm["ptx"], "aligned rows should give 16-byte loads"
types = {"g_ptr": "*bf16", "V": "i32"}
src = ASTSource(_scale_rows_kernel, sig(_scale_rows_kernel, types), constexprs={"BLOCK_V": 4096})
triton.compile(src, target=target, options={"num_warps": 8})
print("compiled")
"""


def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter does not run Triton's code generator: compile to sm_90 cubin offline."""
    assert_compiles_offline_for_sm90(_COMPILE_SCRIPT)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gpu_triton_matches_reference(divergence, dtype):
    s_NV, t_NV, tau_N, mask_N = make_inputs(
        64, 32000 + 7, dtype, per_row_tau=True, masked=True, device="cuda"
    )
    kwargs = dict(divergence=divergence, temperature=tau_N, mask=mask_N, beta=0.3)
    tri, tri_grad, go = loss_and_grad(kd_loss, s_NV, t_NV, backend="triton", **kwargs)
    ref, ref_grad, _ = loss_and_grad(kd_loss_reference, s_NV, t_NV, go=go, **kwargs)
    assert_close(tri, ref, TOL[dtype]["loss"], "loss")
    assert_close(tri_grad, ref_grad, TOL[dtype]["grad"], "grad")


@pytest.mark.gpu
def test_gpu_large_index_no_int32_overflow():
    n_rows, vocab = 16400, 131072  # N * V > 2^31
    s_NV = torch.zeros(n_rows, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t_NV = torch.zeros(n_rows, vocab, device="cuda", dtype=torch.bfloat16)
    t_NV[-1, -1] = 10.0
    loss_N = kd_loss(s_NV, t_NV, reduction="none", backend="triton")
    assert loss_N[-1].item() > 1.0 and loss_N[0].item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- the CPU path's fast rows


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.5, "rows"])
def test_cpu_fast_rows_with_guarded_rows_match_autograd_cpu(divergence, tau):
    """The CPU path computes most rows without the 0 log 0 guards and redoes the rows that come
    out NaN (-inf logits) with them: every row, mixed in one batch, against autograd."""
    s_NV, t_NV = 3 * torch.randn(7, 23), 3 * torch.randn(7, 23)
    t_NV[1, 4:9] = NEG  # teacher -inf only (finite for forward_kl and jsd)
    s_NV[2, :3] = NEG  # student -inf only (finite for reverse_kl and jsd)
    t_NV[3, 10:12] = NEG  # both, at the same words (finite for every divergence)
    s_NV[3, 10:12] = NEG
    keep = {"forward_kl": [0, 1, 3, 4, 5, 6], "reverse_kl": [0, 2, 3, 4, 5, 6], "jsd": list(range(7))}
    rows = torch.tensor(keep[divergence])
    s_NV, t_NV = s_NV[rows].requires_grad_(), t_NV[rows]
    temperature = 0.5 + torch.rand(len(rows)) if tau == "rows" else tau
    kwargs = dict(divergence=divergence, temperature=temperature, beta=0.3, student_temperature=1.3)
    got, grad, go = loss_and_grad(kd_loss, s_NV, t_NV, reduction="none", **kwargs)
    want, want_grad, _ = loss_and_grad(kd_loss_reference, s_NV, t_NV, go=go, reduction="none", **kwargs)
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, atol=1e-7, rtol=1e-5)


def test_cpu_dropped_nan_row_has_zero_gradient_cpu():
    """check_nan=False: a NaN row that the mask drops gives exactly 0 loss and gradient."""
    s_NV, t_NV = torch.randn(4, 9).requires_grad_(), torch.randn(4, 9)
    t_NV[2, 5] = float("nan")
    loss = kd_loss(s_NV, t_NV, mask=torch.tensor([1, 1, 0, 1]), check_nan=False)
    (grad,) = torch.autograd.grad(loss, s_NV)
    assert torch.isfinite(loss) and (grad[2] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_cpu_eager_path_equals_the_custom_op_cpu(divergence):
    """Eager CPU calls skip the custom op (an autograd.Function over the same functions): same
    loss and gradient bit for bit as `torch.ops.padd.kd_loss`, also for an upstream gradient != 1."""
    s_NV, t_NV, tau_N, mask_N = make_inputs(9, 31, per_row_tau=True, masked=True)
    got, grad, go = loss_and_grad(kd_loss, s_NV, t_NV, divergence=divergence, temperature=tau_N, mask=mask_N)
    kept = mask_N.float()
    w_N = kept / kept.sum()
    loss_N, _ = torch.ops.padd.kd_loss(s_NV, t_NV, tau_N, torch.ones(9), w_N, divergence, 0.5, True, True,
                                       "reference")  # fmt: skip
    (want_grad,) = torch.autograd.grad(loss_N.sum(), s_NV, go)
    assert torch.equal(got, loss_N.detach().sum())
    assert torch.equal(grad, want_grad)
