"""Keep helper processes out of the way of preemption signals.

Slurm (``scancel --signal``, ``--signal=USR1@T``, preemption, time limit) signals EVERY process of a
job step, and ``kill -- -PGID`` does the same for a process group. The trainer handles SIGUSR1 /
SIGTERM / SIGINT itself (save at the next step boundary), but a helper process it started keeps
the default action of those signals and dies, taking the save with it. The one that matters:
Megatron's ``dist_checkpointing`` (``strategies/filesystem_async.py``) starts a spawn-context
``multiprocessing.Manager()`` at the first save and keeps it for the life of the process; every
later save sends its write results through that Manager's queue, so a dead Manager turns the next
save into ``BrokenPipeError`` / ``EOFError`` and leaves ``iter_N.tmp``.

A spawned child starts with the signal mask of the thread that forked it (the mask survives
``exec``; CPython installs handlers only for signals it finds at SIG_DFL and never unblocks), so
starting a helper with the preemption signals BLOCKED makes it immune for its whole life, while
the parent only defers (never loses) a signal that arrives meanwhile: it is delivered on unblock.
Forked write workers inherit the parent's Python handlers (which only set a flag), so they are
safe already.

Immune to those signals, the Manager would also outlive a SIGKILLed trainer (and keep
multiprocessing's resource tracker alive with it): it asks the kernel to kill it when the trainer
dies (``PR_SET_PDEATHSIG``), as a torchrun worker does for its launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.managers import SyncManager

import psutil
from typing import Iterator, Mapping, Optional, Sequence

from megatron_longpo.fsutil import write_text_atomic

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def signals_blocked(signals: Sequence[int] = PREEMPTION_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in this thread; children started inside inherit the block (immune)."""
    if threading.current_thread() is not threading.main_thread():
        # Another thread could take a process-directed signal meanwhile; helpers are started from
        # the main thread in this project, so this is a programming error, not a user error.
        raise RuntimeError("signals_blocked must be used on the main thread")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # pending signals are delivered here


def start_checkpoint_helpers() -> None:
    """Start dist_checkpointing's long-lived writer helper now, immune to preemption signals and
    killed with this process.

    Idempotent (Megatron keeps the helper in a module global). Call before the first save; every
    rank that saves must call it.
    """
    # deferred: megatron-core loads only when a save needs it (signals.py is torch-free)
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    with signals_blocked():
        # The spawn context first starts multiprocessing's resource tracker, and CPython UNBLOCKS
        # SIGINT/SIGTERM after starting it (resource_tracker.ensure_running); start it first, then
        # block again so the Manager inherits the full block. (The tracker ignores INT/TERM itself
        # and, started here, has USR1 blocked; it exits when the last holder of its pipe, this
        # process or the Manager, is gone.)
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
        # What filesystem_async._get_write_results_queue builds (a spawn-context Manager's Queue),
        # with an initializer that ties the Manager's life to this process.
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(die_with_parent, (os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _kill_me_when_parent_dies() -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills this process when the thread that
    started it exits. Linux only; returns whether the request is in place."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0


def die_with_parent(parent_pid: int) -> None:
    """A helper process (e.g. the Manager's initializer) dies with ``parent_pid``, the process that
    started it from its main thread: SIGKILL at its death, or now if it is already gone."""
    if _kill_me_when_parent_dies() and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)  # died before the request: nobody will send the signal


def die_with_launcher(env: Optional[Mapping[str, str]] = None) -> bool:
    """A torchrun worker asks the kernel for SIGKILL when its launcher (parent) dies.

    Without it, ``kill -9`` of torchrun / ``megatron_longpo.launch`` leaves the workers running
    and saving into the run directory. No-op outside torchrun (``TORCHELASTIC_RUN_ID`` unset) and
    off Linux; idempotent. Returns whether the request is in place.
    """
    if "TORCHELASTIC_RUN_ID" not in (os.environ if env is None else env) or not _kill_me_when_parent_dies():
        return False
    if os.getppid() == 1:  # the launcher died before the request: nobody will send the signal
        os.kill(os.getpid(), signal.SIGKILL)
    return True


# ----------------------------------------------------------------------------------------------
# Launcher contract (examples/slurm/longpo_launch.sh, docs/slurm.md)
# ----------------------------------------------------------------------------------------------
LAUNCHER_ENV = "LONGPO_LAUNCHER"  # set by megatron_longpo.launch, which reports a hard stop itself
STOP_FILE_ENV = "LONGPO_STOP_FILE"  # exists -> stop at the next boundary (set by the launcher on USR1)
STATUS_FILE_ENV = "LONGPO_RUN_STATUS"  # where rank 0 says how the run ended (read by the launcher)


def stop_file_requested(env: Optional[Mapping[str, str]] = None) -> bool:
    path = (os.environ if env is None else env).get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)


def write_run_status(state: str, reason: Optional[str], requeue: bool, **extra) -> None:
    """Record how this run ended for a launcher (no-op without LONGPO_RUN_STATUS). Call on rank 0.

    ``requeue`` is true only when the run stopped early AND can resume from what it saved, so a
    launcher never requeues a finished or crashed run.
    """
    path = os.environ.get(STATUS_FILE_ENV)
    if path:
        write_text_atomic(path, json.dumps({"state": state, "reason": reason, "requeue": requeue, **extra}) + "\n")


def exit_now(owner_pid: int) -> None:
    """A second Ctrl-C: end this process at once, at any moment (mid-save included), exit 130.

    ``os._exit``, not KeyboardInterrupt: an exception raised by a signal handler that runs inside
    an at-fork hook (dist_checkpointing forks its writers) or under a broad ``except`` is swallowed,
    and the worker would train and save on. A partial ``iter_N.tmp`` is removed at the next start.
    One line, from rank 0's own process (not from forked writer children), and none under
    ``megatron_longpo.launch``, which says it for the whole job.
    """
    if os.getpid() == owner_pid and os.environ.get("RANK", "0") == "0" and not os.environ.get(LAUNCHER_ENV):
        os.write(2, b"[longpo] interrupted: stopped at once without saving this step (exit 130)\n")
    if os.getpid() == owner_pid:
        # Helpers (Megatron's writer Manager, started immune to these signals) would outlive us
        # and keep the job's output pipes open.
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os._exit(130)


class StopFlag:
    """SIGUSR1 / SIGTERM / SIGINT (or the stop file) -> stop at the next boundary; a second Ctrl-C
    stops now: ``exit_now`` (a training process) or KeyboardInterrupt (``hard_stop=False``, a
    library caller). The handler only sets a flag otherwise."""

    def __init__(self, hard_stop: bool = False) -> None:
        self.received: Optional[int] = None
        self.interrupts = 0
        self.hard_stop = hard_stop
        self._previous: dict = {}
        self._pid = os.getpid()

    def install(self) -> "StopFlag":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers exist only on the main thread (e.g. a library caller's worker)
        self._pid = os.getpid()
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # second Ctrl-C: stop now
                if self.hard_stop:
                    exit_now(self._pid)
                raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def requested(self) -> bool:
        return self.received is not None or stop_file_requested()

    def describe(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "stop file"
