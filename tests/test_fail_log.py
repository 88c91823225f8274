"""PADD_FAIL_LOG: failures are written as they happen (tests/conftest.py), for runs that a time
limit may cut off before pytest's own end-of-run summary."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_failure_traceback_is_logged_as_it_happens(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 + 1 == 3, 'arithmetic'\n"
    )
    log = tmp_path / "failures.log"
    env = {**os.environ, "PADD_FAIL_LOG": str(log)}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         str(tmp_path / "test_sample.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = log.read_text()
    assert "test_sample.py::test_bad (call)" in text and "arithmetic" in text
    assert "test_ok" not in text
