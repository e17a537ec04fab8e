"""torchrun with a graceful stop: ``python -m megatron_longpo.launch [torchrun options] SCRIPT [args]``.

Plain torchrun turns SIGTERM / SIGINT into "kill the workers" (the signal, then SIGKILL after
``--shutdown-timeout``, 30 s) and exits with a traceback; its workers run in their own session, so
Ctrl-C in a terminal reaches only torchrun. This launcher takes the same options, but forwards
SIGTERM and SIGINT to the workers ONCE and keeps waiting: the trainer saves at the next
step boundary and exits 0, and so does the launcher. A second Ctrl-C stops now: the workers are
interrupted (no save) and the launcher exits 130 with one line. SIGHUP / SIGQUIT keep torchrun's
behaviour. Used by the Slurm launcher (examples/slurm/longpo_launch.sh) and documented in
docs/training.md.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional, Sequence

import psutil
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing import api as elastic_mp_api
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from megatron_longpo.runtime.signals import LAUNCHER_ENV

FORWARDED = (signal.SIGTERM, signal.SIGINT)


class _Forwarder:
    """Signal handler of the launcher process: forward to the workers, escalate on a second Ctrl-C."""

    def __init__(self) -> None:
        self.interrupts = 0

    def __call__(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if sig not in FORWARDED:  # SIGHUP / SIGQUIT: torchrun's own behaviour
            raise SignalException(f"Process {os.getpid()} got signal: {sig}", sigval=sig)
        if sig == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # torchrun's own path: SIGINT to the workers, then SIGKILL
                raise SignalException(f"second {sig.name}: stopping now", sigval=sig)
        # os.write, not print: a handler may interrupt a print of the main thread (reentrancy).
        hint = " (Ctrl-C again to stop now)" if sig == signal.SIGINT else ""
        os.write(2, f"[longpo.launch] {sig.name}: workers save at the next step boundary and exit{hint}\n".encode())
        for child in psutil.Process().children(recursive=False):
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass


def _has_signals_to_handle() -> bool:
    return any("--signals-to-handle" in a.option_strings for a in torchrun.get_args_parser()._actions)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ[LAUNCHER_ENV] = "1"  # workers leave the one-line report of a hard stop to us
    forward = _Forwarder()
    for sig in FORWARDED:
        signal.signal(sig, forward)
    # SIGUSR1 is ignored, and so inherited by the workers until the trainer installs its handler:
    # Slurm signals every process of the step, and USR1's default action would kill a worker
    # that is still starting up (the Slurm launcher's stop file carries the request instead).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # torchrun's per-process "closing signal" / "failed (exitcode ...)" log lines: this launcher
    # says what happened in one line of its own.
    logging.getLogger(elastic_mp_api.__name__).setLevel(logging.CRITICAL)
    if _has_signals_to_handle():  # torch >= 2.9: torchrun leaves SIGTERM / SIGINT to us
        argv = ["--signals-to-handle=SIGHUP,SIGQUIT", *argv]
    else:  # older torch installs its handler for every signal: route it through ours
        elastic_mp_api._terminate_process_handler = forward
    try:
        torchrun.main(argv)
    except SignalException as e:
        print(f"[longpo.launch] {e.sigval.name}: workers stopped without saving the current step",
              file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        # The workers said why (a start-up refusal prints one line); torchrun's ~40-line
        # ChildFailedError traceback would only bury it.
        return _child_failed(e)
    return 0


def _child_failed(e: ChildFailedError) -> int:
    rank, failure = e.get_first_failure()
    code = failure.exitcode
    if code == 130:  # a worker's second Ctrl-C (runtime/signals.exit_now): it stopped at once, by request
        print("[longpo.launch] interrupted: workers stopped at once without saving this step (exit 130)",
              file=sys.stderr, flush=True)
        return 130
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    others = f" ({len(e.failures) - 1} other worker(s) stopped)" if len(e.failures) > 1 else ""
    print(f"[longpo.launch] worker rank {rank} {how}{others}; its error is above", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
