"""Runs that share a teacher cache train the teacher once: `ensure_teacher` holds `<entry>.lock`
while it trains, and a second run waits for it (saying who holds it), then finds the teacher
built and trains nothing; a run asked to stop while waiting stops instead of hanging."""

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

import padd.pipeline.teacher as teacher_mod
from padd.config import load_config
from padd.pipeline.run_lock import cache_entry_lock
from padd.training.checkpointing import GracefulInterrupt, Interrupted

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "fixtures" / "micro.yaml")

# A second process that takes the entry's lock and says so; with a go-file it then waits for
# that file, "trains" (writes config.json), releases and exits, else it holds the lock until killed.
HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from padd.pipeline.run_lock import cache_entry_lock\n"
    "entry, go = Path(sys.argv[1]), sys.argv[2]\n"
    "with cache_entry_lock(entry):\n"
    "    print('locked', flush=True)\n"
    "    deadline = time.time() + (60 if go else 600)\n"
    "    while not (go and Path(go).exists()) and time.time() < deadline:\n"
    "        time.sleep(0.02)\n"
    "    entry.mkdir(parents=True)\n"
    "    (entry / 'config.json').write_text('{}')\n"
)


def _holder(entry: Path, go: Path | None) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(entry), str(go or "")], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "locked"
    return child


def _cfg(tmp_path: Path):
    return load_config(MICRO, ["teacher.source=train", f"run.cache_dir={tmp_path / 'cache'}"])


def _no_training(*args, **kwargs):
    raise AssertionError("the teacher was trained although another run had built it")


def test_a_second_run_waits_for_the_teacher_being_trained_and_reuses_it(tmp_path, monkeypatch, capsys):
    entry = tmp_path / "cache" / "teacher"
    monkeypatch.setattr(teacher_mod, "_train_and_save_teacher", _no_training)
    go = tmp_path / "go"

    def lock_then_let_the_holder_finish(path, *, on_wait, **kwargs):
        def waiting(holder):  # this run found the lock busy: now the holder may finish
            on_wait(holder)
            go.touch()

        return cache_entry_lock(path, on_wait=waiting, **kwargs)

    monkeypatch.setattr(teacher_mod, "cache_entry_lock", lock_then_let_the_holder_finish)
    child = _holder(entry, go)
    try:
        with GracefulInterrupt() as interrupt:
            info = teacher_mod.ensure_teacher(_cfg(tmp_path), None, entry, [], interrupt, print)
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
    assert info == {"cached": True}
    out = capsys.readouterr().out
    assert f"pid {child.pid}" in out and "waiting for it" in out, out


def test_the_first_run_trains_under_the_lock_and_frees_it(tmp_path, monkeypatch):
    entry = tmp_path / "cache" / "teacher"
    seen = {}

    def fake_training(cfg, tokenizer, path, problems, interrupt, log):
        # While it trains, nobody else can take the entry's lock (another open file description
        # of the lock file conflicts with it, as another process's would).
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        seen["trained"] = True
        return {"cached": False}

    monkeypatch.setattr(teacher_mod, "_train_and_save_teacher", fake_training)
    with GracefulInterrupt() as interrupt:
        info = teacher_mod.ensure_teacher(_cfg(tmp_path), None, entry, [], interrupt, print)
    assert info == {"cached": False} and seen == {"trained": True}
    with cache_entry_lock(entry, should_stop=lambda: True):  # free again: taken without waiting
        pass


def test_a_run_asked_to_stop_stops_waiting(tmp_path, monkeypatch):
    entry = tmp_path / "cache" / "teacher"
    monkeypatch.setattr(teacher_mod, "_train_and_save_teacher", _no_training)
    child = _holder(entry, None)  # holds the lock until killed
    try:
        interrupt = GracefulInterrupt()
        interrupt.signum = 2  # as SIGINT would set it
        with pytest.raises(Interrupted, match="SIGINT"):  # as a stop mid-training ends
            teacher_mod.ensure_teacher(_cfg(tmp_path), None, entry, [], interrupt, print)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert not entry.exists()
