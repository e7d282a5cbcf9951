"""One writer per run or matrix directory, and no orphan trainer.

Every process that writes a run directory (the trainer, `make evaluate`) or a
matrix directory (the matrix runner) holds an exclusive lock on `<dir>/.lock`,
taken atomically with ``fcntl.flock``: the kernel releases it when the process
dies, however it dies, so a dead holder never blocks anyone. The file also holds
the holder's pid, start time and command, only to say who holds it; a pid that
now belongs to another process (a different start time) is recognised as stale.

    with DirLock(run_dir):      # LockBusy (one line) if another process holds it
        ...
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import psutil

LOCK_NAME = ".lock"
# A process started in the same second as the one recorded is the same process
# only if its start time matches to well under the kernel's clock tick.
_START_TOLERANCE_S = 0.05


class LockBusy(RuntimeError):
    """Another live process holds the directory's lock; the message names it."""


def _process_start(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def holder(directory: Path) -> Optional[dict]:
    """The live process recorded in `directory`'s lock file, or None (no lock file,
    released, or the recorded pid has exited or now belongs to another process)."""
    try:
        info = json.loads((Path(directory) / LOCK_NAME).read_text() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not info.get("pid"):
        return None
    if info.get("host") not in (None, socket.gethostname()):
        return info  # another machine's process (shared file system): trust the lock
    start = _process_start(int(info["pid"]))
    if start is None or abs(start - float(info.get("started", 0))) > _START_TOLERANCE_S:
        return None
    try:
        if psutil.Process(int(info["pid"])).status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return info


def describe(info: Optional[dict]) -> str:
    if info is None:
        return "another process (the lock file names none that is still running)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    cmd = " ".join(info.get("cmd", []))
    cmd = cmd if len(cmd) <= 80 else cmd[:77] + "..."
    return f"process {info['pid']} on {info.get('host', '?')} (started {since}: {cmd})"


class DirLock:
    """Exclusive lock on `<directory>/.lock`; a context manager, or acquire()/release()."""

    def __init__(self, directory: Path, what: str = "directory"):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK_NAME
        self._fh = None

    def acquire(self) -> "DirLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise LockBusy(f"{self.directory}: this {self.what} is in use by {describe(holder(self.directory))}; "
                           "wait for it to finish (`make status`) or stop it first") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "started": _process_start(os.getpid()),
                             "host": socket.gethostname(), "cmd": sys.argv}) + "\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.truncate()  # a released lock names nobody
        self._fh.flush()
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# An environment variable tells a torchrun worker that its launcher holds the
# run directory's lock (a second flock from the worker would see it as busy).
HELD_ENV = "ADAMWPRUNE_LOCK_HELD"


def lock_run(directory: Path) -> Optional[DirLock]:
    """The run directory's lock for this process, or None when a parent holds it or
    this is not rank 0 of a distributed job (only rank 0 writes)."""
    if os.environ.get(HELD_ENV) == str(Path(directory).resolve()) or os.environ.get("RANK", "0") != "0":
        return None
    return DirLock(directory, "run directory").acquire()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies
    (PR_SET_PDEATHSIG), so no orphan keeps writing a run directory. SIGTERM lets
    the trainer save a checkpoint on its way out. Linux only; elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
