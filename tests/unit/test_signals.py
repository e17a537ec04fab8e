"""Helper processes started by the trainer survive the preemption signals (Slurm signals every
process of a step): Megatron's checkpoint-writer Manager, started via start_checkpoint_helpers,
keeps serving after SIGUSR1 / SIGTERM / SIGINT; the same Manager started plainly dies (control).
Immune to those signals, the helpers still die with a SIGKILLed trainer."""

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from megatron_longpo.runtime.signals import PREEMPTION_SIGNALS, signals_blocked, start_checkpoint_helpers


def _new_children(before: set) -> list:
    return [c for c in psutil.Process().children(recursive=True) if c.pid not in before]


def _signal_all(procs) -> None:
    for p in procs:
        for sig in PREEMPTION_SIGNALS:
            os.kill(p.pid, sig)
    time.sleep(0.5)


def test_plain_spawn_manager_dies_on_usr1():
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    manager = mp.get_context("spawn").Manager()
    q = manager.Queue()
    kids = [k for k in _new_children(before) if "spawn_main" in " ".join(k.cmdline())]  # the Manager
    assert kids
    for p in kids:
        os.kill(p.pid, signal.SIGUSR1)
    time.sleep(0.5)
    with pytest.raises((BrokenPipeError, EOFError, ConnectionError)):
        q.put(1)


def test_checkpoint_writer_helper_survives_preemption_signals():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    before = {c.pid for c in psutil.Process().children(recursive=True)}
    start_checkpoint_helpers()
    kids = _new_children(before)
    assert kids, "no helper process was started"
    assert any("spawn_main" in " ".join(k.cmdline()) for k in kids)
    _signal_all(kids)  # the Manager and, if this started it, multiprocessing's resource tracker
    assert all(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)
    q = filesystem_async._get_write_results_queue()  # the same, still working queue
    q.put({"ok": 1})
    assert q.get() == {"ok": 1}
    start_checkpoint_helpers()  # idempotent
    assert _new_children(before) == kids


def test_signal_arriving_while_blocked_is_delivered_after():
    # Thread-directed, so that no other thread of the process can take it meanwhile (a signal
    # sent to the process may be taken by another thread: then it is handled at once, not lost).
    got = []
    prev = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    try:
        with signals_blocked():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
            time.sleep(0.05)
            assert got == []
        time.sleep(0.05)
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, prev)


HELPERS_THEN_SLEEP = """
import time
from megatron_longpo.runtime.signals import start_checkpoint_helpers
if __name__ == "__main__":  # the spawned Manager re-imports __main__
    start_checkpoint_helpers()
    print("ready", flush=True)
    time.sleep(300)
"""


def test_checkpoint_writer_helpers_die_with_a_sigkilled_trainer():
    # Was: the Manager (blocked signals, nobody watching its parent) and the resource tracker it
    # keeps open outlived kill -9 of the trainer: `pgrep -f spawn_main` still listed them.
    trainer = subprocess.Popen([sys.executable, "-c", HELPERS_THEN_SLEEP], stdout=subprocess.PIPE, text=True)
    helpers = []
    try:
        assert trainer.stdout.readline().strip() == "ready"
        helpers = psutil.Process(trainer.pid).children(recursive=True)
        assert any("spawn_main" in " ".join(h.cmdline()) for h in helpers), [h.cmdline() for h in helpers]
        trainer.kill()
        trainer.wait(timeout=10)
        _, alive = psutil.wait_procs(helpers, timeout=5)
        assert not alive, [" ".join(h.cmdline()) for h in alive]
    finally:
        trainer.kill()
        for h in helpers:  # never leave a leaked helper behind, whatever the outcome
            with contextlib.suppress(psutil.Error):
                h.kill()
