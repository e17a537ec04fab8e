"""Preemption: SIGTERM / SIGUSR1 -> save at the next step boundary and exit 0.

Slurm sends SIGTERM (or, with ``--signal=USR1@T``, SIGUSR1 T seconds early) to every task. A
handler only sets a flag; the loop asks :meth:`should_stop` at each step boundary, which
all-reduces the flag (MAX) so that every rank saves the same step even if only some ranks got the
signal. ``exit_duration_mins`` is folded into the same decision.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist


class StopController:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, exit_duration_mins: Optional[float] = None, start_time: Optional[float] = None) -> None:
        self.received: Optional[int] = None
        self.exit_duration_s = exit_duration_mins * 60 if exit_duration_mins else None
        self.start = start_time if start_time is not None else time.time()
        self._previous = {}

    def install(self) -> "StopController":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> Optional[str]:
        """Reason to stop now (agreed by all ranks), or None."""
        local = 0
        if self.received is not None:
            local = 1
        elif self.exit_duration_s is not None and time.time() - self.start >= self.exit_duration_s:
            local = 2
        flag = torch.tensor([local], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if torch.cuda.is_available():
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        v = int(flag.item())
        if v == 1:
            return "signal"
        if v == 2:
            return "exit_duration_mins"
        return None
