"""One writer per run directory: an exclusive ``flock`` on ``RUN/.longpo.lock`` held by rank 0 of
the training run for its whole life.

The kernel drops a ``flock`` when its holder exits for any reason (a crash, ``kill -9``), so a
crashed run never leaves the directory locked, and a stale lock file is harmless: only the lock
counts, the file's text (pid, host, start time) just names the holder in the refusal. Network file
systems without ``flock`` support (some NFS mounts) make the lock a no-op there.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO, Optional

from megatron_longpo.checkpoint.format import CheckpointError
from megatron_longpo.checkpoint.integrity import broadcast_from_rank0
from megatron_longpo.runtime.distributed import rank

LOCK_FILE = ".longpo.lock"


class RunLock:
    """The held lock of one run directory (rank 0 holds the file; other ranks hold nothing)."""

    def __init__(self, path: Path, handle: Optional[IO]) -> None:
        self.path = path
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(run: Path) -> tuple[Optional[IO], Optional[str]]:
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return None, (f"checkpoint.save={run} is in use by another training run ({holder}): one run writes a "
                      f"run directory at a time. Wait for it to finish or stop it, or set checkpoint.save to another "
                      f"directory (checkpoint.load={run} starts from its weights)")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
    handle.flush()
    return handle, None


def acquire_run_lock(run_dir: str | Path) -> RunLock:
    """Collective: lock ``run_dir`` for this run (rank 0 holds it) or raise CheckpointError on every rank."""
    run = Path(run_dir)
    handle, err = _try_lock(run) if rank() == 0 else (None, None)
    err = broadcast_from_rank0(err)
    if err:
        raise CheckpointError(err)
    return RunLock(run / LOCK_FILE, handle)


__all__ = ["LOCK_FILE", "RunLock", "acquire_run_lock"]
