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
