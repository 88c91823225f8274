"""Helpers for tests that run `padd train` in a subprocess and interrupt or compare its runs."""

import json
import signal
import subprocess
import time
from pathlib import Path


def train_records(run_dir: Path) -> list[dict]:
    """The run's Stages II–IV step records, without their wall-clock timings (which differ
    between runs; everything else must match exactly)."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [
        {k: v for k, v in r.items() if not k.startswith("time")} for r in recs if r.get("stage") == "train"
    ]


def sigterm_once_training_starts(proc: subprocess.Popen, run_dir: Path, timeout_s: float) -> str:
    """SIGTERM `proc` as soon as `run_dir`'s metrics show a training step (or at `timeout_s`, or
    once it has exited), wait for it (at most `timeout_s` more) and return its stderr."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"stage": "train"' in metrics.read_text():
            break  # training has started
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout_s)
    return err
