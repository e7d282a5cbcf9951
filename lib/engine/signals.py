"""Stop requests: SIGTERM, SIGUSR2 and Ctrl-C end a run cleanly between two steps.

Schedulers send SIGTERM (Slurm on preemption, `scancel`, `scontrol requeue`, the
end of the time limit; Kubernetes; systemd) or SIGUSR2 (Slurm's `--signal`, which
submitit uses before a time limit) some time before they kill a job; Ctrl-C sends
SIGINT to the terminal's processes. The handler only records which signal came.
The training loop looks at the record between steps, writes last.pt at the step
it reached and returns; the process then exits with EXIT_INTERRUPTED, so whoever
started it can tell "stopped, resumable with `make continue`" from "failed".

A launcher starts its children with these signals blocked (``preexec_block``):
one that arrives while the child is still importing torch stays pending instead
of killing it, and is delivered as soon as the child installs its handler.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

EXIT_INTERRUPTED = 75  # sysexits' EX_TEMPFAIL: "try again later" (make continue)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
SECOND_CTRL_C_S = 1.0  # a second Ctrl-C this long after the first aborts without saving


class Interrupted(Exception):
    """A stop signal ended the command after saving what can be resumed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """Records the first stop signal; a second Ctrl-C (after SECOND_CTRL_C_S) aborts.

    Two Ctrl-C within a second are one request: the terminal signals a whole
    process group, and a launcher (torchrun) may pass the same signal on.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._at = 0.0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "no signal"

    def handle(self, signum: int, frame=None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._at = signum, now
        elif signum == signal.SIGINT and now - self._at > SECOND_CTRL_C_S:
            raise KeyboardInterrupt

    def agreed(self, dist, device, poll: bool) -> bool:
        """Whether to stop now. One process: whenever a signal came. DDP ranks may get
        the signal at different steps, so they decide together, at `poll` steps only
        (every rank computes the same `poll`): stop when any rank has a request."""
        if not dist.enabled:
            return self.requested
        if not poll:
            return False
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([1 if self.requested else 0], device=device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = signal.SIGTERM  # another rank's request
        return bool(flag.item())


_active: Optional[StopRequest] = None


@contextmanager
def catching() -> Iterator[StopRequest]:
    """Install the stop handlers for the duration (re-entrant: an inner call shares
    the outer request). Outside the main thread nothing can be installed; the
    request then never fires."""
    global _active
    if _active is not None:
        yield _active
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    old = {s: signal.signal(s, request.handle) for s in STOP_SIGNALS}
    _active = request
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # deliver what a launcher held back
        yield request
    finally:
        _active = None
        for s, h in old.items():
            signal.signal(s, h)


def install() -> StopRequest:
    """For a command-line process: the handlers stay until the process exits, so a
    signal that comes while it shuts down (a launcher passing Ctrl-C on) is recorded
    too instead of killing it with a misleading exit status."""
    global _active
    if _active is None and threading.current_thread() is threading.main_thread():
        _active = StopRequest()
        for s in STOP_SIGNALS:
            signal.signal(s, _active.handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return _active or StopRequest()


def ignore_from_now() -> None:
    """The command is done: a stop signal during interpreter shutdown is ignored (Python
    would reset its handlers to the default, and a late SIGTERM would then turn a
    finished or cleanly stopped process into one "killed by SIGTERM")."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def active() -> Optional[StopRequest]:
    return _active


def preexec_block() -> None:
    """For subprocess.Popen(preexec_fn=...): the child starts with the stop signals
    blocked (pending, not lost) until its own handlers are installed."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def resume_hint(run_dir) -> str:
    """The command that resumes a run (its matrix, for a matrix cell)."""
    from pathlib import Path

    run_dir = Path(run_dir)
    target = run_dir.parent if (run_dir.parent / "matrix.json").exists() else run_dir
    return f"make continue DIR={target}"
