"""A run directory has one writer: while a live process holds `<run>/lock`, a second `padd train`
(with or without `--compare`) exits 2 with one line naming the holder (pid, host) and writes
nothing; a lock left by a dead process is taken over; a pipeline frees the lock when it closes or
fails to start; `--force` wipes a run directory but keeps the lock its caller holds."""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from padd.config import load_config
from padd.pipeline.run import Pipeline
from padd.pipeline.run_dir import LOCK_FILE, RunDir, RunDirError
from padd.pipeline.run_lock import RunDirBusy, RunDirLock

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "fixtures" / "micro.yaml")

# A second process that takes the lock, says so, and keeps it until it is killed.
HOLD = (
    "import sys, time\n"
    "from padd.pipeline.run_lock import RunDirLock\n"
    "RunDirLock(sys.argv[1]).acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


@contextlib.contextmanager
def _holder(run_dir: Path):
    """A live child process holding `run_dir`'s lock; yields its pid, kills it on exit."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        yield child.pid
    finally:
        child.kill()
        child.wait(timeout=60)


def _padd(*args: str) -> tuple[int, str]:
    """`padd ARGS` in this process (the child is the other process): exit status, stderr."""
    from padd.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, err.getvalue()


@pytest.mark.parametrize("compare", [False, True], ids=["train", "train--compare"])
def test_a_second_run_on_a_directory_in_use_exits_2_naming_the_holder(tmp_path, compare):
    run_dir = tmp_path / "run"
    with _holder(run_dir) as pid:
        args = ["train", MICRO, f"run.dir={run_dir}", f"run.cache_dir={tmp_path / 'cache'}"]
        rc, err = _padd(*args, *(["--compare"] if compare else []))
    assert rc == 2
    assert err.count("\n") == 1, err  # one line
    assert f"pid {pid} on host {socket.gethostname()}" in err and str(run_dir) in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    assert not (tmp_path / "cache").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    with _holder(tmp_path) as pid:
        os.kill(pid, signal.SIGKILL)  # dies without releasing: its record stays in the file
        os.waitpid(pid, 0)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == pid
    with RunDirLock(tmp_path) as lock:
        assert lock.held
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: no holder named


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}") as busy:
            RunDirLock(tmp_path).acquire()
        assert busy.value.key == "run.dir"
    with RunDirLock(tmp_path):  # free again
        pass


def test_a_pipeline_frees_the_lock_when_it_fails_to_start_and_when_it_closes(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(MICRO, [f"run.dir={run_dir}", f"run.cache_dir={tmp_path / 'cache'}"])
    run_dir.mkdir()
    (run_dir / "fingerprint").write_text("made-by-another-config\n")
    with pytest.raises(RunDirError, match="different config"):
        Pipeline(cfg, log=lambda msg: None)
    with RunDirLock(run_dir):  # not left held by the failed start
        pass
    (run_dir / "fingerprint").unlink()
    pipe = Pipeline(cfg, log=lambda msg: None)
    assert pipe.lock.held
    with pytest.raises(RunDirBusy):
        RunDirLock(run_dir).acquire()
    pipe.close()
    with RunDirLock(run_dir):
        pass


def test_force_wipes_the_run_directory_but_keeps_the_held_lock(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(MICRO, [f"run.dir={run_dir}"])
    (run_dir / "train" / "ckpt").mkdir(parents=True)
    (run_dir / "fingerprint").write_text("made-by-another-config\n")
    with RunDirLock(run_dir):
        inode = (run_dir / LOCK_FILE).stat().st_ino
        RunDir(run_dir).prepare(cfg, force=True)
        assert not (run_dir / "train").exists()
        assert (run_dir / LOCK_FILE).stat().st_ino == inode  # the same file: still the lock
        with pytest.raises(RunDirBusy):
            RunDirLock(run_dir).acquire()
