"""Print a Markdown summary of GPU benchmark results: padd against each peer, same run, same shape.

    python benchmarks/summarize.py benchmarks/results/*gpu*.json

One row per (file, op, shape) with padd's time and figure, and padd's speed-up over every peer
measured beside it (peer time / padd time; > 1 means padd is faster). Nothing is computed that
the JSON does not hold: the figures are the benchmark's own.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _figure(record: dict) -> str:
    # No % of peak for a device without a known peak (a CPU, an unlisted GPU).
    peak = f" ({record['pct_peak']:.1f}% peak)" if record.get("pct_peak") is not None else ""
    if record.get("tflops"):
        return f"{record['tflops']:.0f} TFLOP/s{peak}"
    if record.get("gbps"):
        return f"{record['gbps']:.0f} GB/s{peak}"
    return ""


def _shape(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if k != "dtype")


def summarize(paths: list[Path]) -> str:
    lines = ["| op | shape | padd | padd figure | speed-up over peers (same run) |", "|---|---|---|---|---|"]
    for path in paths:
        data = json.loads(path.read_text())
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for record in data["records"]:
            groups[(record["op"], json.dumps(record["shape"], sort_keys=True))].append(record)
        for (op, _), records in groups.items():
            # The entry point, not the tuning variants ("padd kernel (...)").
            entry = [r for r in records if r["impl"].startswith("padd") and "kernel (" not in r["impl"]]
            padd = entry[0] if entry else None
            if padd is None:
                continue
            peers = ", ".join(
                f"{r['impl']} {r['median_ms'] / padd['median_ms']:.2f}x" for r in records if r is not padd
            )
            lines.append(
                f"| {op} | {_shape(padd['shape'])} | {padd['median_ms']:.3f} ms | {_figure(padd)} | {peers} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize([Path(p) for p in sys.argv[1:]]))
