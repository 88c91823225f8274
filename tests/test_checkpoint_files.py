"""The file side of `padd.training.checkpointing`: atomic writes leave the old version or the new one
and no temporary behind, `CheckpointDir` points at its newest step and keeps `keep` of them, and a
signal under `GracefulInterrupt` only sets a flag that `check()` turns into `Interrupted`."""

import json
import os
import signal

import pytest
import torch

from padd.training.checkpointing import (
    LATEST,
    CheckpointDir,
    GracefulInterrupt,
    Interrupted,
    atomic_dir,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_writes_replace_whole_files_and_leave_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "sub" / "a.txt", "old")
    atomic_write_json(tmp_path / "sub" / "b.json", {"x": 1})
    atomic_torch_save({"t": torch.arange(3)}, tmp_path / "sub" / "c.pt")
    atomic_write_text(tmp_path / "sub" / "a.txt", "new")
    assert (tmp_path / "sub" / "a.txt").read_text() == "new"
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": 1}
    assert torch.equal(torch.load(tmp_path / "sub" / "c.pt")["t"], torch.arange(3))
    assert _leftovers(tmp_path / "sub") == []


def test_a_failed_write_keeps_the_old_file_and_folder(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    atomic_dir(tmp_path / "d", lambda d: (d / "w").write_text("old"))

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.txt", {"x": Unserialisable()})

    def fail(d):
        (d / "w").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "d", fail)
    assert (tmp_path / "a.txt").read_text() == "old"
    assert (tmp_path / "d" / "w").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_checkpoint_dir_points_at_the_newest_step_and_prunes(tmp_path):
    ckpts = CheckpointDir(tmp_path / "ckpt", keep=2)
    assert ckpts.latest() is None
    for step in (1, 2, 3):
        ckpts.save(step, lambda d, s=step: (d / "step").write_text(str(s)))
    latest = ckpts.latest()
    assert latest is not None and (latest / "step").read_text() == "3"
    assert (tmp_path / "ckpt" / LATEST).read_text().strip() == latest.name
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_000002", "step_000003"]


def test_a_signal_sets_a_flag_that_check_raises(tmp_path):
    with GracefulInterrupt() as interrupt:
        interrupt.check()  # nothing arrived: no-op
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested and interrupt.signum == signal.SIGTERM
        with pytest.raises(Interrupted, match="SIGTERM") as raised:
            interrupt.check()
        assert raised.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not interrupt._handle  # the previous handler is back
