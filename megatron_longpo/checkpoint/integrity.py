"""Checkpoint integrity: a size + CRC32 manifest written at save, verified at load, disk-space checks.

    iter_N/manifest.json   {"format": ..., "files": {"common.pt": {"size": .., "crc32": ..}, ...}}

A torn or truncated shard otherwise surfaces as a ~200-line traceback from deep inside
torch.distributed.checkpoint that names no file, and overwritten bytes load silently. The
manifest covers every file of the iteration except ``longpo_meta.json`` (written after it) and
itself. Hashing and verification are split round-robin over the ranks (a 7B run with optimizer
state writes ~100 GB; each rank reads its share once, at ~1 GB/s for CRC32), then gathered.
Checkpoints written before the manifest existed load unverified (the error message of a later
problem still names the directory).
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

from megatron_longpo.checkpoint.format import META_FILE, CheckpointError
from megatron_longpo.fsutil import write_text_atomic
from megatron_longpo.runtime.capabilities import collective_device
from megatron_longpo.runtime.distributed import rank as dist_rank
from megatron_longpo.runtime.distributed import world_size

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "megatron_longpo.checkpoint_manifest"
VERIFY_LEVELS = ("full", "size", "none")
_BLOCK = 1 << 20


class CheckpointCorruptError(CheckpointError):
    """Files of a checkpoint iteration differ from the manifest written when it was saved."""

    def __init__(self, message: str, iter_dir: Path, problems: list[str]) -> None:
        super().__init__(message)
        self.iter_dir = iter_dir
        self.problems = problems


@dataclass(frozen=True)
class FileRecord:
    size: int
    crc32: str


def file_record(path: Path) -> FileRecord:
    # One reused buffer: f.read() would allocate a fresh block per call (two alive at a time),
    # memory that a conversion still holding the whole model adds to its peak.
    crc, size = 0, 0
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return FileRecord(size, f"{crc:08x}")


def _gather(obj):
    """All ranks' ``obj`` (a list of one element without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _files(iter_dir: Path) -> list[str]:
    skip = {MANIFEST_FILE, META_FILE}
    out = []
    for p in iter_dir.rglob("*"):
        if p.is_file() and p.name not in skip:
            out.append(p.relative_to(iter_dir).as_posix())
    return sorted(out)


def write_manifest(iter_dir: str | Path) -> dict:
    """Collective: hash every file of ``iter_dir`` (each rank a share), rank 0 writes the manifest."""
    d = Path(iter_dir)
    rank, world = dist_rank(), world_size()
    names = _files(d) if rank == 0 else None
    names = broadcast_from_rank0(names)
    mine = {n: file_record(d / n).__dict__ for n in names[rank::world]}
    files: dict = {}
    for part in _gather(mine):
        files.update(part)
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "files": {n: files[n] for n in names}}
    if rank == 0:
        write_text_atomic(d / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_manifest(iter_dir: Path) -> Optional[dict]:
    p = iter_dir / MANIFEST_FILE
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointCorruptError(f"{p}: not valid JSON ({e})", iter_dir, [str(p)]) from e
    if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), dict):
        raise CheckpointCorruptError(f"{p}: not a checkpoint manifest", iter_dir, [str(p)])
    return data


def find_problems(iter_dir: Path, names: list[str], files: dict, level: str) -> list[str]:
    """One line per file of ``names`` that is missing, has the wrong size or the wrong CRC32."""
    problems = []
    for n in names:
        want = files[n]
        p = iter_dir / n
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        size = p.stat().st_size
        if size != want["size"]:
            problems.append(f"{p}: {size} bytes, expected {want['size']} (truncated or overwritten)")
            continue
        if level == "full":
            got = file_record(p).crc32
            if got != want["crc32"]:
                problems.append(f"{p}: checksum {got} != {want['crc32']} recorded at save (bytes changed)")
    return problems


def complete_iterations(run_dir: Path) -> list[int]:
    """Iterations of ``run_dir`` that finished saving (have ``longpo_meta.json``), ascending."""
    out = []
    for p in run_dir.glob("iter_*"):
        if p.is_dir() and (p / META_FILE).is_file() and p.name[5:].isdigit():
            out.append(int(p.name[5:]))
    return sorted(out)


def verify_checkpoint(iter_dir: str | Path, level: str = "full") -> bool:
    """Collective when distributed: check ``iter_dir`` against its manifest.

    Returns False when the checkpoint has no manifest (written by an older version), True when it
    verified, and raises :class:`CheckpointCorruptError` naming every bad file and the earlier
    complete iterations of the same run (with the option that loads one) otherwise.
    """
    if level not in VERIFY_LEVELS:
        raise ValueError(f"checkpoint verification level {level!r}; expected one of {VERIFY_LEVELS}")
    d = Path(iter_dir)
    if level == "none":
        return False
    rank, world = dist_rank(), world_size()
    try:
        manifest = read_manifest(d) if rank == 0 else None
        err = None
    except CheckpointCorruptError as e:
        manifest, err = None, str(e)
    manifest, err = broadcast_from_rank0((manifest, err))
    if err:
        raise CheckpointCorruptError(_corrupt_message(d, [err]), d, [err])
    if manifest is None:
        return False
    names = list(manifest["files"])
    mine = find_problems(d, names[rank::world], manifest["files"], level)
    problems = sorted(p for part in _gather(mine) for p in part)
    if problems:
        raise CheckpointCorruptError(_corrupt_message(d, problems), d, problems)
    mark_verified(d)
    return True


_VERIFIED: set[tuple] = set()  # iteration dirs this process verified or wrote (retention counts these)


def _identity(iter_dir: str | Path) -> Optional[tuple]:
    """The directory as it is now: a rewritten iteration (new manifest) is a different one."""
    d = Path(iter_dir)
    try:
        st = (d / MANIFEST_FILE).stat()
    except OSError:
        return None
    return str(d.resolve()), st.st_ino, st.st_mtime_ns, st.st_size


def mark_verified(iter_dir: str | Path) -> None:
    ident = _identity(iter_dir)
    if ident is not None:
        _VERIFIED.add(ident)


def forget_verified() -> None:
    """Start afresh, as a new process does (pooled test workers run many trainings)."""
    _VERIFIED.clear()


def is_verified(iter_dir: str | Path) -> bool:
    return _identity(iter_dir) in _VERIFIED


def _corrupt_message(d: Path, problems: list[str]) -> str:
    shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
    return f"checkpoint {d} is damaged:\n  {shown}\n{earlier_hint(d)}"


def earlier_hint(d: Path) -> str:
    """What to load instead of the damaged iteration ``d``: advice every reader of a checkpoint accepts."""
    earlier = [i for i in complete_iterations(d.parent) if f"iter_{i:07d}" < d.name]
    if not earlier:
        return "no earlier complete iteration exists in this run directory; restore the files from a backup"
    alt = d.parent / f"iter_{earlier[-1]:07d}"
    return (f"earlier complete iteration(s) of this run: {earlier}; use {alt} instead (every tool and "
            f"checkpoint.load take an iteration directory; when resuming checkpoint.save, set "
            f"checkpoint.load_iteration={earlier[-1]}, or leave checkpoint.fallback_on_corrupt=true and the "
            f"damaged one is set aside automatically)")


# ----------------------------------------------------------------------------------------------
# Disk space and leftovers
# ----------------------------------------------------------------------------------------------


def _main_tensors(sharded_state_dict: dict):
    """The tensors this rank writes: main replicas of sharded tensors, and plain tensors."""
    for v in nested_values(sharded_state_dict):
        if isinstance(v, ShardedTensor) and is_main_replica(v.replica_id) and v.data is not None:
            yield v.data
        elif isinstance(v, torch.Tensor):
            yield v


def state_dict_bytes(sharded_state_dict: dict) -> int:
    """Bytes this rank's main replicas add to a checkpoint (tensors only; objects are small)."""
    return sum(t.numel() * t.element_size() for t in _main_tensors(sharded_state_dict))


def state_dict_numel(sharded_state_dict: dict) -> int:
    """Elements of this rank's main replicas (what optimizer state is sized by)."""
    return sum(t.numel() for t in _main_tensors(sharded_state_dict))


def save_bytes_needed(tensor_bytes: int) -> int:
    """Free space a save of ``tensor_bytes`` of tensors needs: proportional headroom for the
    metadata, pickled objects and file-system blocks (10%), plus 1 MiB for the small files."""
    return int(tensor_bytes * 1.10) + (1 << 20)


def _all_reduce_bytes(nbytes: int) -> int:
    need = torch.tensor([float(nbytes)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        need = need.to(collective_device())
        dist.all_reduce(need)
    return int(need.item())


def require_free_space(run_dir: Path, tensor_bytes: int, what: str) -> None:
    """Collective: raise CheckpointError on every rank when the file system of ``run_dir`` cannot
    hold ``what`` (a checkpoint with ``tensor_bytes``, this rank's share, summed over ranks)."""
    need_bytes = save_bytes_needed(_all_reduce_bytes(tensor_bytes))
    msg = None
    if dist_rank() == 0:
        probe = run_dir if run_dir.exists() else next((p for p in run_dir.parents if p.exists()), Path("/"))
        free = shutil.disk_usage(probe).free
        if free < need_bytes:
            prev = complete_iterations(run_dir) if run_dir.is_dir() else []
            kept = f"; the previous checkpoint iter_{prev[-1]:07d} is intact" if prev else ""
            msg = (f"not enough disk space to {what} in {run_dir}: a checkpoint needs about "
                   f"{need_bytes / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free; free space, lower "
                   f"checkpoint.keep_last, or set checkpoint.save to a larger file system{kept}")
    msg = broadcast_from_rank0(msg)
    if msg:
        raise CheckpointError(msg)


def check_free_space(run_dir: Path, sharded_state_dict: dict, iteration: int) -> None:
    """Collective: refuse a save that cannot fit on the file system of ``run_dir``, before writing."""
    require_free_space(run_dir, state_dict_bytes(sharded_state_dict), f"save iteration {iteration}")


def remove_leftovers(run_dir: str | Path, log=print) -> list[str]:
    """Delete ``iter_*.tmp`` / ``iter_*.old`` left by an interrupted save (rank 0); returns their names."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("iter_")
                   and (p.name.endswith(".tmp") or p.name.endswith(".old")))
    for p in found:
        log(f"[longpo] removing {p}: an incomplete save left by an interrupted run (never loaded)")
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in found]


__all__ = [
    "MANIFEST_FILE", "VERIFY_LEVELS", "CheckpointCorruptError", "broadcast_from_rank0", "check_free_space",
    "require_free_space", "save_bytes_needed", "state_dict_bytes", "state_dict_numel", "complete_iterations",
    "earlier_hint", "file_record", "forget_verified", "is_verified", "mark_verified", "read_manifest", "remove_leftovers", "verify_checkpoint", "write_manifest",
]
