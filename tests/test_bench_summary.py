"""`benchmarks/summarize.py`: padd's row and its speed-ups over the peers of the same op and shape."""

import json

from benchmarks.summarize import summarize


def _record(impl, ms, **extra):
    return {"suite": "s", "op": "fwd", "impl": impl, "shape": {"T": 8, "dtype": "bf16"}, "median_ms": ms,
            "tflops": extra.get("tflops"), "gbps": None, "pct_peak": extra.get("pct_peak")}  # fmt: skip


def test_speedups_are_peer_time_over_padd_time(tmp_path):
    path = tmp_path / "r.json"
    records = [
        _record("padd kernel (variant)", 0.5),  # a tuning variant is not the entry point
        _record("padd op", 2.0, tflops=100.0, pct_peak=10.0),
        _record("eager", 4.0),
        _record("compiled", 1.0),
    ]
    path.write_text(json.dumps({"device": {}, "records": records}))
    row = summarize([path]).splitlines()[-1]
    assert row.startswith("| fwd | T=8 | 2.000 ms | 100 TFLOP/s (10.0% peak) |")
    assert "eager 2.00x" in row and "compiled 0.50x" in row and "padd kernel (variant) 0.25x" in row


def test_interleaved_timing_warms_each_call_and_shuffles_the_order():
    """`time_interleaved` on CPU: each timed call follows an untimed call of the same
    implementation, and each round calls them in a shuffled order, so no implementation is timed
    on caches another one left cold; a failing one is dropped and reported, the others still
    timed."""
    from benchmarks.common import time_interleaved

    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}

    def broken():
        raise RuntimeError("API moved")

    out = time_interleaved({**fns, "d": broken}, warmup=0, reps=12)
    assert isinstance(out["d"], RuntimeError) and set(out) == {"a", "b", "c", "d"}
    assert all(out[name]["median_ms"] >= 0 for name in "abc")
    assert len(calls) == 12 * 3 * 2 and calls[0::2] == calls[1::2]  # warm-up, then the timed call
    timed = calls[1::2]
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    before_a = {timed[i - 1] for i in range(1, len(timed)) if timed[i] == "a"}
    assert before_a == {"b", "c"}  # `a` follows each of the others, not always the same one
