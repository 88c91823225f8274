"""KD-loss benchmark: padd `kd_loss` / `fused_linear_kd_loss` against their peers, in one process.

    python -m pytest benchmarks/bench_kd_loss.py -s          (PADD_BENCH_OUT=dir writes JSON)

Ops, all forward + backward (the gradient wrt the student is what training pays for):
  kd_fwd_kl    KL(p_T || p_S) on logits [N, V]: padd (Triton on GPU, reference on CPU), torch
               eager (log_softmax + kl_div), torch.compile of it, Liger's LigerKLDIVLoss (fed
               log-softmaxes, as its API requires).
  kd_jsd       beta = 0.5 JSD on logits: padd, torch eager, torch.compile, LigerJSD.
  fused_linear_jsd  JSD of two LM heads, hidden [N, H] -> V: padd fused_linear_kd_loss, the
               unfused torch eager path, LigerFusedLinearJSD.
Peers that are not importable are skipped with the reason printed.

Environment (all optional; shapes default to the full GPU grid below, or one tiny CPU shape):
  PADD_BENCH_KD_LOGITS="16384x128256"        NxV shapes of the logits ops
  PADD_BENCH_KD_LINEAR="8192x128256x4096"    NxVxH shapes of the fused-linear op
  PADD_BENCH_KD_VARIANTS=0                   leave out the GPU tuning variants of padd's kernel
The JSON (PADD_BENCH_OUT) is rewritten after every measurement: a run cut short keeps them.

Figures: time (median, p20/p80); for the logits ops, effective GB/s over the bytes a fused
kernel must move (read both logits, write the gradient) and its % of HBM peak; for the
fused-linear op, TFLOP/s of its GEMMs (2NVH for each head + 2 x 2NVH for the two gradients);
peak CUDA memory above the inputs. On CPU every row is labelled CPU and the shapes are the
embedded default's (N = 2048 KD rows over V = 100, H = 128) plus the earlier 64 x 1000 smoke
shape; padd and its peers run interleaved in one loop (PADD_BENCH_CPU_REPS rounds, default 30)
and each padd row carries `speedup_vs_eager` (torch eager's median over padd's, same run) and
the same ratio of process CPU times. They are not GPU results.

Shape legend: N token rows, V vocabulary, H hidden size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from padd.kernels import TeacherHead, fused_linear_kd_loss, kd_loss, kd_loss_reference

from benchmarks.common import (
    bench_device,
    cpu_reps,
    env_shapes,
    make_record,
    on_gpu,
    peak_memory_mb,
    print_table,
    time_fn,
    time_interleaved,
    write_results,
)

SUITE = "kd_loss"
GPU_LOGIT_SHAPES = ",".join(f"{n}x{v}" for n in (4096, 8192, 16384) for v in (32000, 128256, 151936))
GPU_LINEAR_SHAPES = ",".join(
    f"{n}x{v}x{h}" for n in (4096, 8192, 16384) for v in (32000, 128256, 151936) for h in (2048, 4096)
)
# CPU: the embedded default's KD rows (64 rollouts x up to 32 response tokens over the char
# tokenizer's 100 symbols; the student's hidden size 128), then the earlier smoke shape.
CPU_LOGIT_SHAPES = "2048x100,64x1000"
CPU_LINEAR_SHAPES = "2048x100x128,64x1000x32"
LOGIT_SHAPES = env_shapes("PADD_BENCH_KD_LOGITS", GPU_LOGIT_SHAPES if on_gpu() else CPU_LOGIT_SHAPES)
LINEAR_SHAPES = env_shapes("PADD_BENCH_KD_LINEAR", GPU_LINEAR_SHAPES if on_gpu() else CPU_LINEAR_SHAPES)
DTYPE = torch.bfloat16 if on_gpu() else torch.float32
_REPS = {"warmup": 3, "reps": 10} if on_gpu() else {"warmup": 3, "reps": cpu_reps(30)}
_RECORDS: list = []
Impl = tuple[str, Callable | None, str]


def eager_forward_kl(student_NV: torch.Tensor, teacher_NV: torch.Tensor) -> torch.Tensor:
    """What users write today: log_softmax of both, then kl_div(batchmean) = KL(p_T || p_S) / N."""
    log_q_NV = torch.log_softmax(student_NV.float(), dim=-1)
    log_p_NV = torch.log_softmax(teacher_NV.float(), dim=-1)
    return F.kl_div(log_q_NV, log_p_NV, reduction="batchmean", log_target=True)


def eager_jsd(student_NV: torch.Tensor, teacher_NV: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q, mean over rows."""
    log_q_NV = torch.log_softmax(student_NV.float(), dim=-1)
    log_p_NV = torch.log_softmax(teacher_NV.float(), dim=-1)
    log_m_NV = torch.logaddexp(log_p_NV + math.log(beta), log_q_NV + math.log(1 - beta))
    kl_pm = F.kl_div(log_m_NV, log_p_NV, reduction="batchmean", log_target=True)
    kl_qm = F.kl_div(log_m_NV, log_q_NV, reduction="batchmean", log_target=True)
    return beta * kl_pm + (1 - beta) * kl_qm


_compiled_forward_kl = torch.compile(eager_forward_kl)
_compiled_jsd = torch.compile(eager_jsd)
# Compiling the peers costs ~25 s on a 2-core CPU, for figures that mean nothing there.
_COMPILE_ON_CPU = os.environ.get("PADD_BENCH_CPU_COMPILE") == "1"
_NO_COMPILE_REASON = "CPU smoke run (set PADD_BENCH_CPU_COMPILE=1 to include torch.compile on CPU)"


def _liger(name: str) -> tuple[object | None, str]:
    try:
        import liger_kernel.transformers as liger
    except Exception as exc:  # absent or broken install: a peer, never a requirement
        return None, f"Liger-Kernel not importable ({type(exc).__name__}: {exc})"
    if not on_gpu():
        return None, "Liger-Kernel needs CUDA"
    return getattr(liger, name, None), f"liger_kernel.transformers has no {name}"


def _padd_name(op: str) -> str:
    return f"padd.{op} (triton)" if on_gpu() else f"padd.{op} (reference)"


def logit_impls(divergence: str) -> list[Impl]:
    """(name, fn(student, teacher) -> loss, skip reason) for one logits divergence."""
    padd = lambda s, t: kd_loss(s, t, divergence=divergence, reduction="batchmean", check_nan=False)
    eager, compiled = (
        (eager_forward_kl, _compiled_forward_kl) if divergence == "forward_kl" else (eager_jsd, _compiled_jsd)
    )
    if not (on_gpu() or _COMPILE_ON_CPU):
        compiled = None
    impls: list[Impl] = [(_padd_name("kd_loss"), padd, ""), ("torch eager", eager, "")]
    if divergence == "forward_kl":
        cls, reason = _liger("LigerKLDIVLoss")
        fn = None
        if cls is not None:
            module = cls(reduction="batchmean", log_target=True)
            fn = lambda s, t: module(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))
        impls.append(("Liger LigerKLDIVLoss", fn, reason))
    else:
        cls, reason = _liger("LigerJSD")
        fn = None
        if cls is not None:
            module = cls(beta=0.5)
            fn = lambda s, t: module(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))
        impls.append(("Liger LigerJSD", fn, reason))
    # Last: compiling costs tens of seconds, and a time limit should cut it rather than Liger.
    impls.append(("torch.compile", compiled, _NO_COMPILE_REASON))
    return impls


def _fwd_bwd(fn: Callable, leaves: list[torch.Tensor], *args) -> Callable[[], object]:
    """A closure running forward + backward, returning grads without accumulating into .grad."""
    return lambda: torch.autograd.grad(fn(*leaves, *args), leaves)


def _measure(suite_op: str, name: str, run: Callable, shape: dict, **figures) -> None:
    try:
        timing = time_fn(run, **_REPS)
        peak = peak_memory_mb(run)
    except torch.OutOfMemoryError:
        print(f"skip {name} {shape}: out of memory")
        torch.cuda.empty_cache()
        return
    except Exception as exc:  # a peer whose API moved: report it, do not fail the suite
        print(f"skip {name} {shape}: failed ({type(exc).__name__}: {exc})")
        return
    _RECORDS.append(make_record(SUITE, suite_op, name, shape, timing, peak_mem_mb=peak, **figures))
    if os.environ.get("PADD_BENCH_OUT"):  # after every measurement: a run cut short keeps them
        write_results(SUITE, _RECORDS)


def _measure_cpu_group(suite_op: str, runs: dict[str, Callable], shape: dict, **figures) -> None:
    """CPU: every implementation timed in one interleaved loop (common.time_interleaved), so the
    ratio of padd to torch eager comes from the same run under the same load."""
    timings = time_interleaved(runs, **_REPS)
    records = {}
    for name, timing in timings.items():
        if isinstance(timing, Exception):
            print(f"skip {name} {shape}: failed ({type(timing).__name__}: {timing})")
            continue
        cpu_ms = timing.pop("cpu_median_ms", None)
        records[name] = make_record(SUITE, suite_op, name, shape, timing, cpu_median_ms=cpu_ms, **figures)
    padd = next((r for n, r in records.items() if n.startswith("padd")), None)
    eager = next((r for n, r in records.items() if n.startswith("torch eager")), None)
    if padd is not None and eager is not None:
        padd.extra["speedup_vs_eager"] = eager.median_ms / padd.median_ms
        padd_cpu, eager_cpu = padd.extra.get("cpu_median_ms"), eager.extra.get("cpu_median_ms")
        if padd_cpu and eager_cpu:
            padd.extra["speedup_vs_eager_cpu_time"] = eager_cpu / padd_cpu
        print(f"  {suite_op} {shape}: padd is {padd.extra['speedup_vs_eager']:.2f}x as fast as torch eager")
    _RECORDS.extend(records.values())
    if os.environ.get("PADD_BENCH_OUT"):
        write_results(SUITE, _RECORDS)


def _check_padd_logits(student_NV, teacher_NV, divergence):
    """No figure for a kernel that disagrees with its reference (checked on a row slice)."""
    rows = slice(0, 256)
    got = kd_loss(student_NV[rows].detach(), teacher_NV[rows], divergence=divergence, reduction="none")
    want = kd_loss_reference(
        student_NV[rows].detach(), teacher_NV[rows], divergence=divergence, reduction="none"
    )
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if _RECORDS:
        print_table(_RECORDS)
        if os.environ.get("PADD_BENCH_OUT"):
            print("results:", write_results(SUITE, _RECORDS))


def kernel_variants(divergence: str) -> list[Impl]:
    """GPU only: the raw logits kernel under other grids / block sizes, to tune the default.

    Same work as padd's forward + backward (the backward's scaling is skipped for an upstream
    gradient of 1); "persistent" grids keep fewer rows in flight so the second sweep over a
    row can hit L2.
    """
    if not on_gpu() or os.environ.get("PADD_BENCH_KD_VARIANTS") == "0":
        return []
    from padd.kernels.kd_loss.triton import kd_loss_triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    knobs = {
        "persistent 1/SM, 16 warps": dict(num_programs=sms, num_warps=16),
        "persistent 4/SM, 8 warps": dict(num_programs=4 * sms, num_warps=8),
        "BLOCK_V 4096, 8 warps (old default)": dict(block_v=4096, num_warps=8),
    }

    def variant(knob: dict) -> Callable:
        def run(student_NV, teacher_NV):
            ones_N = torch.ones(student_NV.shape[0], device=student_NV.device)
            args = (student_NV.detach(), teacher_NV, ones_N, ones_N, ones_N, divergence, 0.5, True)
            return kd_loss_triton(*args, **knob)

        return run

    return [(f"padd kernel ({name})", variant(knob), "") for name, knob in knobs.items()]


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("n_rows,vocab", LOGIT_SHAPES)
def test_bench_kd_logits(n_rows, vocab, divergence):
    torch.manual_seed(0)
    device = bench_device()
    student_NV = torch.randn(n_rows, vocab, device=device).to(DTYPE).requires_grad_()
    teacher_NV = torch.randn(n_rows, vocab, device=device).to(DTYPE)
    _check_padd_logits(student_NV, teacher_NV, divergence)
    shape = {"N": n_rows, "V": vocab, "dtype": str(DTYPE).removeprefix("torch.")}
    bytes_moved = 3 * n_rows * vocab * DTYPE.itemsize  # read both logits, write the gradient
    op = "kd_fwd_kl" if divergence == "forward_kl" else "kd_jsd"
    runs = {}
    for name, fn, reason in logit_impls(divergence):
        if fn is None:
            print(f"skip {name}: {reason}")
            continue
        if on_gpu():
            _measure(op, name, _fwd_bwd(fn, [student_NV], teacher_NV), shape, bytes_moved=bytes_moved)
        else:
            runs[name] = _fwd_bwd(fn, [student_NV], teacher_NV)
    if runs:
        _measure_cpu_group(op, runs, shape, bytes_moved=bytes_moved)
    for name, fn, _ in kernel_variants(divergence):
        _measure(op, name, lambda fn=fn: fn(student_NV, teacher_NV), shape, bytes_moved=bytes_moved)


def linear_impls() -> list[Impl]:
    """(name, fn(student_hidden, student_weight, teacher_hidden, teacher_weight) -> loss, reason)."""
    padd = lambda h, w, th, tw: fused_linear_kd_loss(
        h, w, TeacherHead(th, tw), divergence="jsd", check_nan=False
    )

    def eager(h, w, th, tw):
        with torch.no_grad():
            teacher_NV = th @ tw.t()
        return eager_jsd(h @ w.t(), teacher_NV)

    impls: list[Impl] = [(_padd_name("fused_linear_kd_loss"), padd, ""), ("torch eager (unfused)", eager, "")]
    cls, reason = _liger("LigerFusedLinearJSD")
    fn = None
    if cls is not None:
        module = cls(jsd_beta=0.5)
        fn = lambda h, w, th, tw: module(h, w, th, tw, None)  # no labels: every row counts
    impls.append(("Liger LigerFusedLinearJSD", fn, reason))
    return impls


@pytest.mark.parametrize("n_rows,vocab,hidden", LINEAR_SHAPES)
def test_bench_fused_linear_jsd(n_rows, vocab, hidden):
    torch.manual_seed(0)
    device = bench_device()
    student_h_NH = torch.randn(n_rows, hidden, device=device).to(DTYPE).requires_grad_()
    student_w_VH = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(DTYPE).requires_grad_()
    teacher_h_NH = torch.randn(n_rows, hidden, device=device).to(DTYPE)
    teacher_w_VH = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(DTYPE)
    _check_padd_linear(student_h_NH, student_w_VH, teacher_h_NH, teacher_w_VH)
    shape = {"N": n_rows, "V": vocab, "H": hidden, "dtype": str(DTYPE).removeprefix("torch.")}
    flops = 2 * n_rows * vocab * hidden * (1 + 2 + 1)  # student logits, 2 grads, teacher logits
    leaves = [student_h_NH, student_w_VH]
    runs = {}
    for name, fn, reason in linear_impls():
        if fn is None:
            print(f"skip {name}: {reason}")
            continue
        run = _fwd_bwd(fn, leaves, teacher_h_NH, teacher_w_VH)
        if on_gpu():
            _measure("fused_linear_jsd", name, run, shape, flops=flops)
        else:
            runs[name] = run
    if runs:
        _measure_cpu_group("fused_linear_jsd", runs, shape, flops=flops)


def _check_padd_linear(h_NH, w_VH, th_NH, tw_VH):
    rows = slice(0, 256)
    got = fused_linear_kd_loss(
        h_NH[rows].detach(), w_VH.detach(), TeacherHead(th_NH[rows], tw_VH), divergence="jsd"
    )
    with torch.no_grad():
        want = eager_jsd(h_NH[rows] @ w_VH.t(), th_NH[rows] @ tw_VH.t())
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)
