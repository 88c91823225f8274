"""One writer per run directory: `padd train` (and `padd convert`) hold `<run dir>/lock` while they run.

The lock is an advisory `flock` on that file, which the kernel releases when the holder exits,
however it exits (crash, `kill -9`, power loss on a local disk). A lock file left by a dead
process, its pid still recorded, is therefore taken over by the next run. The file records the
holder (pid, host, start time) so that a refused run can say who has the directory.

Everything a run writes happens under its lock, `--compare` included: its methods run one after
another in the process that holds the lock, each into its own `compare/<method>/`. A second
`padd train --compare` on the same directory (other `compare.methods` leave the config's
fingerprint unchanged) is refused like any second run.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from padd.pipeline.run_dir import LOCK_FILE, RunDirError

__all__ = ["LOCK_FILE", "RunDirBusy", "RunDirLock", "cache_entry_lock"]


class RunDirBusy(RunDirError):
    """Another live process holds the run directory; the message names it (pid and host)."""

    def __init__(self, root: Path, holder: dict[str, Any]) -> None:
        who = (
            f"pid {holder['pid']} on host {holder['host']}, since {holder.get('since', '?')}"
            if {"pid", "host"} <= set(holder)
            else "a process that has not recorded itself yet"
        )
        super().__init__("run.dir", f"{root} is in use by another padd run ({who}); wait for it or stop it")
        self.holder = holder


class RunDirLock:
    """The lock of one run directory (created if needed).

    Example:
        >>> with RunDirLock("runs/tiny"):  # raises RunDirBusy while another process has it
        ...     ...  # the only writer of runs/tiny
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise `RunDirBusy` naming the live process that has it."""
        if self._fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(self.root, holder) from None
        except BaseException:
            os.close(fd)
            raise
        _record_holder(fd)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up. The file stays: deleting it could let a process that already opened
        it lock a file that no newcomer sees."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a free lock names no holder
        finally:
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextmanager
def cache_entry_lock(
    entry: str | os.PathLike,
    *,
    on_wait: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_s: float = 0.5,
) -> Iterator[None]:
    """Hold `<entry>.lock`, an advisory `flock` beside a shared cache entry, waiting while another
    process holds it: runs that share a cache (seeds started side by side) then build an entry
    once, and the others find it built when they get the lock.

    Args:
        entry: the cache entry (a file or folder; need not exist yet).
        on_wait: called once, with the holder's record (pid, host, since; {} if unknown), when
            the lock is busy.
        should_stop: polled while waiting; when it returns True the wait ends with `InterruptedError`
            (a run asked to stop must not hang on another run's lock).
        poll_s: seconds between tries while waiting.
    """
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(entry.with_name(entry.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and on_wait is not None:
                    on_wait(_read_holder(fd))
                waited = True
                if should_stop is not None and should_stop():
                    raise InterruptedError(f"stopped while waiting for {entry}.lock") from None
                time.sleep(poll_s)
        _record_holder(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the flock


def _record_holder(fd: int) -> None:
    """Write this process (pid, host, start time) into a lock file it has just locked."""
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)  # whatever a dead holder left
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder the lock file records, or {} while it is being written (or unreadable)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
