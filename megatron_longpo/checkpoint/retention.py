"""Which iterations of a run directory stay: only intact ones count, the newest intact one is never
deleted, a damaged one is set aside (renamed ``iter_N.damaged``, reported), never kept as if good.

"Intact" means verified against its save-time manifest in this process (loaded, or written by this
process: the manifest hashes the bytes just written) or verified here, once, before it is counted
(``checkpoint.verify`` decides how: full | size | none; ``none`` trusts every complete iteration,
and a checkpoint written before manifests existed cannot be checked and counts as intact).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from megatron_longpo.checkpoint.format import LATEST_FILE, iter_dir_name, latest_iteration
from megatron_longpo.checkpoint.integrity import (
    CheckpointCorruptError,
    broadcast_from_rank0,
    complete_iterations,
    is_verified,
    verify_checkpoint,
)
from megatron_longpo.fsutil import write_text_atomic
from megatron_longpo.runtime.distributed import rank

DAMAGED_SUFFIX = ".damaged"
Log = Callable[[str], None]


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _aside_name(d: Path) -> Path:
    dst, n = d.with_name(d.name + DAMAGED_SUFFIX), 1
    while dst.exists():
        dst, n = d.with_name(f"{d.name}{DAMAGED_SUFFIX}.{n}"), n + 1
    return dst


def repoint_latest(run: Path) -> None:
    """Rank 0: make the latest pointer name the newest complete iteration (or remove it)."""
    latest = latest_iteration(run)
    if latest is None or (run / iter_dir_name(latest)).is_dir():
        return
    done = complete_iterations(run)
    if done:
        write_text_atomic(run / LATEST_FILE, f"{done[-1]}\n")
    else:
        (run / LATEST_FILE).unlink()


def set_aside(iter_dir: Path, err: CheckpointCorruptError, log: Log = print) -> Optional[Path]:
    """Collective: rank 0 renames damaged ``iter_dir`` to ``iter_N.damaged`` and repoints the latest
    pointer to the newest complete iteration left; returns the new path (rank 0)."""
    dst = None
    if rank() == 0 and iter_dir.is_dir():
        dst = _aside_name(iter_dir)
        iter_dir.rename(dst)
        repoint_latest(iter_dir.parent)
        first = err.problems[0] if err.problems else str(err)
        log(f"[longpo] WARNING: set aside damaged checkpoint {iter_dir} as {dst.name} ({first}); it is never "
            f"loaded or counted by checkpoint.keep_last again; inspect or delete it")
    _barrier()
    return dst


def prune(run: Path, keep_last: int, verify: str = "full", log: Log = print, current: Optional[int] = None) -> list[int]:
    """Collective: keep the newest ``keep_last`` intact iterations of ``run``, delete older ones.

    ``current`` (the iteration just saved, which the latest pointer names) is always kept and
    counted. The others are walked newest first; one not yet verified in this process is verified
    now (once); a damaged one is set aside and not counted. Only iterations older than every kept
    one are deleted: one newer than ``current`` (a resume from an older iteration with
    ``checkpoint.load_iteration``) is verified and kept, or set aside.
    Returns the kept iterations. ``keep_last`` <= 0 keeps everything.
    """
    if keep_last <= 0:
        return []
    done = broadcast_from_rank0(complete_iterations(run) if rank() == 0 else None)
    kept: list[int] = [current] if current in done else []
    for it in reversed(done):
        if it == current:
            continue
        if len(kept) >= keep_last and (current is None or it < current):
            break
        d = run / iter_dir_name(it)
        if not is_verified(d):
            try:
                verify_checkpoint(d, verify)
            except CheckpointCorruptError as err:
                set_aside(d, err, log)
                continue
        kept.append(it)
    if rank() == 0:
        for it in done:
            if it not in kept and it < min(kept, default=it + 1):
                _remove(run / iter_dir_name(it))
    _barrier()
    return kept


def _remove(d: Path) -> None:
    # Rename first: a crash mid-delete leaves iter_N.old (removed at the next start), never a
    # half-deleted directory that still looks complete.
    old = d.with_name(d.name + ".old")
    d.rename(old)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["DAMAGED_SUFFIX", "prune", "repoint_latest", "set_aside"]
