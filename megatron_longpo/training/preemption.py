"""Preemption: signals, a stop file and time budgets -> save at the next step boundary and exit 0.

Stop requests (any one of them, on any rank):
  signal      SIGUSR1 (Slurm preemption / ``--signal=USR1@T``), SIGTERM (``kill``, docker,
              Kubernetes, ``scancel``), SIGINT (Ctrl-C). A second Ctrl-C stops NOW (KeyboardInterrupt,
              no save); repeated SIGTERM / SIGUSR1 do not escalate.
  stop file   ``LONGPO_STOP_FILE`` exists (the Slurm launcher creates it on USR1, so a signal that
              arrives while the trainer is still starting up is not lost).
  exit_duration_mins  wall-clock budget of this run.
  time_limit  ``LONGPO_JOB_END_TIME`` (epoch seconds; the Slurm launcher sets it from the job's end
              time): stop when the time left no longer covers the longest step seen, the longest
              save seen (a step's time before the first save) and ``LONGPO_STOP_SAFETY_S``.
A handler only sets a flag; :meth:`should_stop` all-reduces the decision (MAX) at each step
boundary so that every rank saves the same step. :meth:`write_status` records how the run ended in
``LONGPO_RUN_STATUS`` so that a launcher knows whether to requeue (``docs/slurm.md``).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from megatron_longpo.runtime.capabilities import collective_device
from megatron_longpo.runtime.distributed import rank
from megatron_longpo.runtime.signals import PREEMPTION_SIGNALS, STOP_FILE_ENV, StopFlag, write_run_status

# Stop reasons, in all-reduce priority order (a larger code wins when ranks disagree).
REASONS = {1: "exit_duration_mins", 2: "time_limit", 3: "signal"}
RESUMABLE = ("signal", "exit_duration_mins", "time_limit")  # a launcher requeues after these
DEFAULT_SAFETY_S = 60.0


class StopController:
    SIGNALS = PREEMPTION_SIGNALS

    def __init__(
        self,
        exit_duration_mins: Optional[float] = None,
        start_time: Optional[float] = None,
        end_time: Optional[float] = None,
        safety_s: float = DEFAULT_SAFETY_S,
        env: Optional[Mapping[str, str]] = None,
        hard_stop: bool = False,
    ) -> None:
        self.flag = StopFlag(hard_stop)
        self.env = env
        self.exit_duration_s = exit_duration_mins * 60 if exit_duration_mins else None
        self.start = start_time if start_time is not None else time.time()
        self.end_time = end_time
        self.safety_s = safety_s
        self.max_step_s = 0.0
        self.max_save_s: Optional[float] = None
        self._announced = False

    @classmethod
    def from_env(cls, exit_duration_mins: Optional[float] = None, start_time: Optional[float] = None,
                 env: Optional[Mapping[str, str]] = None, hard_stop: bool = False) -> "StopController":
        """The launcher's knobs: LONGPO_JOB_END_TIME, LONGPO_STOP_SAFETY_S, LONGPO_STOP_FILE (docs/slurm.md).
        ``hard_stop``: a second Ctrl-C ends the process at once (exit 130; the training CLI)."""
        e = os.environ if env is None else env
        end = e.get("LONGPO_JOB_END_TIME") or None
        return cls(exit_duration_mins, start_time, end_time=float(end) if end else None,
                   safety_s=float(e.get("LONGPO_STOP_SAFETY_S") or DEFAULT_SAFETY_S), env=env, hard_stop=hard_stop)

    @property
    def received(self) -> Optional[int]:
        return self.flag.received

    def install(self) -> "StopController":
        self.flag.install()
        return self

    def uninstall(self) -> None:
        self.flag.uninstall()

    def note_step(self, seconds: float) -> None:
        self.max_step_s = max(self.max_step_s, seconds)

    def note_save(self, seconds: float) -> None:
        self.max_save_s = max(self.max_save_s or 0.0, seconds)

    def seconds_needed(self) -> float:
        """Time one more step and its save need before the job ends (a step's time until a save is seen)."""
        save = self.max_save_s if self.max_save_s is not None else self.max_step_s
        return self.max_step_s + save + self.safety_s

    def _local_reason(self, now: float) -> int:
        stop_file = (os.environ if self.env is None else self.env).get(STOP_FILE_ENV)
        if self.flag.received is not None or (stop_file and os.path.exists(stop_file)):
            return 3
        if self.end_time is not None and self.end_time - now < self.seconds_needed():
            return 2
        if self.exit_duration_s is not None and now - self.start >= self.exit_duration_s:
            return 1
        return 0

    def should_stop(self) -> Optional[str]:
        """Reason to stop now (agreed by all ranks), or None."""
        local = self._local_reason(time.time())
        if self.flag.received is not None and not self._announced:
            self._announced = True
            hint = " (Ctrl-C again to stop now)" if self.flag.received == signal.SIGINT else ""
            print(f"[longpo] {signal.Signals(self.flag.received).name} received on rank {rank()}: saving at "
                  f"this step boundary{hint}", flush=True)
        flag = torch.tensor([local], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = flag.to(collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return REASONS.get(int(flag.item()))

    def write_status(self, stopped_by: Optional[str], iteration: int, checkpoint: Optional[str]) -> None:
        """Rank 0 records how the run ended for the launcher (LONGPO_RUN_STATUS): requeue only after a
        resumable stop (signal, time budget) that saved a checkpoint."""
        if rank() == 0:
            write_run_status("stopped" if stopped_by else "done", stopped_by,
                             bool(stopped_by in RESUMABLE and checkpoint), iteration=iteration, checkpoint=checkpoint)
