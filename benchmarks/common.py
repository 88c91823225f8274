"""Shared benchmark plumbing: device facts, peak figures, timing and the results file.

Every suite measures padd against its peers in the same process and reports figures as a
ratio to them. CPU timings are labelled as such and never called GPU results.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# CPU threads for torch ($PADD_BENCH_CPU_THREADS): on a CPU shared with other processes, two
# OpenMP threads spin at every barrier while the other one waits for a core, which turns wall
# and CPU times into measures of the load; one thread measures the work. The JSON records it.
if not torch.cuda.is_available() and os.environ.get("PADD_BENCH_CPU_THREADS"):
    torch.set_num_threads(int(os.environ["PADD_BENCH_CPU_THREADS"]))

# Dense bf16 tensor-core peak and HBM bandwidth by GPU name fragment (vendor datasheets).
PEAKS = {
    "H100": {"bf16_tflops": 989.0, "hbm_gbps": 3350.0},
    "H200": {"bf16_tflops": 989.0, "hbm_gbps": 4800.0},
    "A100": {"bf16_tflops": 312.0, "hbm_gbps": 2039.0},
}


def family_eager_forward(module: torch.nn.Module) -> Callable | None:
    """A transformers experts module's own forward (the per-expert loop that
    `@use_experts_implementation` wraps), from the decorated class in the MRO; None if absent."""
    for cls in type(module).__mro__:
        wrapped = getattr(cls.__dict__.get("forward"), "__wrapped__", None)
        if wrapped is not None:
            return wrapped
    return None


def device_info() -> dict:
    """Name, versions and peak figures of the device the benchmarks run on."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:
        info["transformers"] = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        info.update(device=name, kind="gpu")
        for key, peak in PEAKS.items():
            if key in name:
                info.update(peak)
    else:
        info.update(
            device=f"CPU {os.cpu_count()} cores",
            cpu=platform.processor() or platform.machine(),
            torch_threads=torch.get_num_threads(),
            kind="cpu",
        )
    return info


def on_gpu() -> bool:
    return torch.cuda.is_available()


def bench_device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


def _quantiles(times_ms: list[float]) -> dict:
    """Median/p20/p80 of a list of timings in ms."""
    times = sorted(times_ms)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def time_fn(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10) -> dict:
    """Median/p20/p80 wall time of `fn` in ms (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if on_gpu():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, warmup: int = 3, reps: int = 10
) -> dict[str, dict | Exception]:
    """`time_fn` for several implementations at once, their calls interleaved (each round calls
    every implementation once, in a freshly shuffled order): on a CPU shared with other processes
    the load drifts over seconds, and interleaving makes it hit every implementation alike, so
    ratios measured in one call are comparable.

    On CPU each timed call comes right after an untimed call of the same implementation. A
    sub-millisecond call made right after another, bigger one (torch.compile's guards, a
    0.5-second peer) runs on cold caches: ~30 µs slower at the default's routing shape, up to 2x
    for the experts at T = 256. With a fixed order that penalty fell on whoever came next; with
    a shuffled order alone it fell at random on a third of each one's samples. Warmed by its own
    call, every implementation is timed in the same state.

    Returns name -> timing dict (`time_fn`'s keys, plus `cpu_median_ms`: the process CPU time
    per call, less sensitive to other processes than wall time), or the exception it raised
    (a failing implementation is dropped from the remaining rounds)."""
    out: dict[str, dict | Exception] = {}
    live = dict(fns)
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as exc:  # a peer whose API moved: the caller reports it
            out[name] = exc
            del live[name]
    wall: dict[str, list[float]] = {name: [] for name in live}
    cpu: dict[str, list[float]] = {name: [] for name in live}
    order = random.Random(0)  # the same shuffles on every run of a suite
    for _ in range(reps):
        names = list(live)
        order.shuffle(names)
        for name in names:
            if name not in live:  # dropped earlier in this round
                continue
            fn = live[name]
            if on_gpu():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                wall[name].append(start.elapsed_time(end))
                continue
            try:
                fn()  # the untimed call that warms the caches for this implementation
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
            except Exception as exc:
                out[name] = exc
                del live[name]
                continue
            cpu[name].append((time.process_time() - c0) * 1e3)
            wall[name].append((time.perf_counter() - t0) * 1e3)
    for name in live:
        timing = _quantiles(wall[name])
        if cpu[name]:
            timing["cpu_median_ms"] = _quantiles(cpu[name])["median_ms"]
        out[name] = timing
    return out


def cpu_reps(default: int) -> int:
    """Repetitions per CPU measurement: $PADD_BENCH_CPU_REPS, or `default`."""
    return int(os.environ.get("PADD_BENCH_CPU_REPS", default))


def time_cuda_graph(fn: Callable[[], object], *, reps: int = 50, rounds: int = 5) -> dict:
    """Device time per call without host launch overhead: `fn` captured once in a CUDA graph,
    replayed `reps` times between two events; median/p20/p80 over `rounds` (ms per call).

    Small memory-bound kernels (routing) finish faster than Python can launch them, so the
    plain timing measures the host. `fn` must not synchronise with the host (no `.item()`,
    no data-dependent shapes)."""
    if not on_gpu():
        raise RuntimeError("CUDA graphs need a GPU")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return _quantiles(times)


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory above the current allocation while `fn` runs; None on CPU."""
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@dataclass
class Record:
    """One (op, implementation, shape) measurement."""

    suite: str
    op: str
    impl: str
    shape: dict
    median_ms: float
    p20_ms: float
    p80_ms: float
    tflops: float | None = None
    gbps: float | None = None
    pct_peak: float | None = None
    peak_mem_mb: float | None = None
    extra: dict = field(default_factory=dict)


def make_record(suite, op, impl, shape, timing, *, flops=None, bytes_moved=None, peak_mem_mb=None, **extra):
    """Build a Record with TFLOP/s or GB/s and % of the device's peak where known."""
    info = device_info()
    sec = timing["median_ms"] / 1e3
    tflops = flops / sec / 1e12 if flops else None
    gbps = bytes_moved / sec / 1e9 if bytes_moved else None
    pct = None
    if tflops is not None and "bf16_tflops" in info:
        pct = 100.0 * tflops / info["bf16_tflops"]
    elif gbps is not None and "hbm_gbps" in info:
        pct = 100.0 * gbps / info["hbm_gbps"]
    return Record(
        suite,
        op,
        impl,
        shape,
        timing["median_ms"],
        timing["p20_ms"],
        timing["p80_ms"],
        tflops,
        gbps,
        pct,
        peak_mem_mb,
        extra,
    )


def print_table(records: list[Record]) -> None:
    """Print records side by side, each with its speed-up over the first impl of its shape."""
    kind = device_info()["kind"].upper()
    base: dict[tuple, float] = {}
    for r in records:
        key = (r.op, json.dumps(r.shape, sort_keys=True))
        base.setdefault(key, r.median_ms)
        ratio = base[key] / r.median_ms if r.median_ms else float("nan")
        figs = []
        if r.tflops is not None:
            figs.append(f"{r.tflops:8.2f} TFLOP/s")
        if r.gbps is not None:
            figs.append(f"{r.gbps:8.1f} GB/s")
        if r.pct_peak is not None:
            figs.append(f"{r.pct_peak:5.1f}% peak")
        if r.peak_mem_mb is not None:
            figs.append(f"{r.peak_mem_mb:8.1f} MiB")
        if "speedup_vs_eager" in r.extra:
            figs.append(f"padd {r.extra['speedup_vs_eager']:.2f}x as fast as torch eager (same run)")
        print(
            f"[{kind}] {r.op:<18} {r.impl:<22} {r.shape} {r.median_ms:9.3f} ms  x{ratio:5.2f}  "
            + "  ".join(figs)
        )


def write_results(
    suite: str, records: list[Record], path: str | os.PathLike | None = None, *, extra: dict | None = None
) -> Path:
    """Write `{device, records, **extra}` JSON to $PADD_BENCH_OUT (or `path`, or benchmarks/results).

    The file is `{suite}-{cpu|gpu}-{date}[-{tag}].json`, the tag from $PADD_BENCH_TAG (one suite
    run twice in one session, e.g. decode and prefill shapes, keeps both files). Written to a
    temporary file and renamed, so a run killed mid-write leaves the previous complete file.
    """
    out_dir = Path(path or os.environ.get("PADD_BENCH_OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    info = device_info()
    stamp = time.strftime("%Y%m%d")
    tag = os.environ.get("PADD_BENCH_TAG", "")
    out = out_dir / f"{suite}-{info['kind']}-{stamp}{'-' + tag if tag else ''}.json"
    payload = {"device": info, "records": [asdict(r) for r in records], **(extra or {})}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out)
    return out


def write_if_requested(suite: str, records: list[Record], extra: dict | None = None) -> Path | None:
    """`write_results` when $PADD_BENCH_OUT is set (suites call it after every measurement, so a
    run cut off by its time limit keeps what it measured); None otherwise."""
    if not os.environ.get("PADD_BENCH_OUT"):
        return None
    return write_results(suite, records, extra=extra)


def report_suite(suite: str, records: list[Record], skipped: list, extra: dict | None = None) -> None:
    """End of a suite: print its table and write its JSON (with what was skipped, and why)."""
    if records or skipped:
        print_table(records)
        write_if_requested(suite, records, {"skipped": skipped, **(extra or {})})


def env_list(name: str, default: str) -> list[str]:
    """Comma-separated values of environment variable `name` (or `default`), blanks dropped."""
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def env_shapes(name: str, default: str) -> list[tuple[int, ...]]:
    """Shapes from `name`, e.g. "16384x128256,8192x32000" -> [(16384, 128256), (8192, 32000)]."""
    return [tuple(int(d) for d in v.split("x")) for v in env_list(name, default)]
