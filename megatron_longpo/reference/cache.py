"""The reference log-prob cache on disk (format documented in docs/reference_cache.md).

    CACHE/                 a directory, created as CACHE.tmp-* and renamed when complete
      meta.json            format, version, mode, shapes, fingerprints, model config, file hashes
      turns.npy            float64 [N, T, 2]  per-turn sums (side 0 chosen, 1 rejected); NaN: no turn
      totals.npy           float64 [N, 2]     sums over turns (what the loss uses)
      counts.npy           int32   [N, T, 2]  response tokens behind each value (0: no turn)

Every check of :func:`open_cache` runs on small files (meta.json, the dataset sidecar, checkpoint
metadata, the arrays themselves are a few MB) and raises :class:`ReferenceCacheError` naming
the mismatch and the exact command that rebuilds the cache.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shlex
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_longpo.config import ConfigError
from megatron_longpo.fsutil import fsync_path
from megatron_longpo.reference.fingerprint import describe_dataset_mismatch

FORMAT_NAME = "megatron_longpo.reference_cache"
FORMAT_VERSION = 1
META_FILE = "meta.json"
ARRAYS = {"turns": ("turns.npy", np.float64), "totals": ("totals.npy", np.float64), "counts": ("counts.npy", np.int32)}


class ReferenceCacheError(ConfigError):
    """A reference cache is missing, stale or damaged; the message says which and how to rebuild it."""


def fresh_cache_path(cache: str | Path, data: str, mode: str) -> Path:
    """A path next to ``cache`` that does not exist yet, named after the dataset and mode."""
    c = Path(cache)
    base = c.parent / f"{Path(data).name}.{mode}.ref_cache"
    cand, n = base, 2
    while cand.exists() or cand == c:
        cand, n = base.with_name(f"{base.name}-{n}"), n + 1
    return cand


def rebuild_command(
    cache: str | Path,
    data: str,
    mode: str,
    load: Optional[str] = None,
    rope_theta: Optional[float] = None,
    *,
    stale: bool = False,
    option: str = "reference.cache_path",
) -> str:
    """The command line that builds the cache this run needs (N: processes per node, a multiple of --tp).

    An existing ``cache`` is replaced (``--overwrite``) only when ``stale``: it is provably of no
    use to anyone (damaged files; or built from the very dataset / checkpoint path it names, whose
    content has changed since). Otherwise it may be valid for another dataset, mode or reference
    (hours of precompute at 128K), so the command writes a fresh path and says to point ``option``
    at it.
    """
    out = Path(cache)
    replace = out.exists() and stale
    if out.exists() and not stale:
        out = fresh_cache_path(cache, data, mode)
    parts = [
        "torchrun", "--nproc-per-node", "N", "tools/precompute_reference.py",
        "--load", str(load) if load else "REF_CKPT", "--data", str(data), "--output", str(out),
        "--mode", mode,
    ]
    if rope_theta is not None:
        parts += ["--rope-theta", repr(float(rope_theta))]
    if replace:
        parts.append("--overwrite")
    cmd = " ".join(p if p in ("N", "REF_CKPT") else shlex.quote(p) for p in parts)
    if out != Path(cache):
        cmd += f" (a new path: {cache} may still be valid for its own dataset/mode; then set {option}={out})"
    return cmd


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and Path(a).resolve() == Path(b).resolve()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()



# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write_cache(path: str | Path, turns: np.ndarray, counts: np.ndarray, totals: np.ndarray,
                meta: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Write the cache under a temp name in the same directory, then rename it into place.

    Returns the meta.json written. An existing cache is replaced only with ``overwrite``, and only
    after the new one is complete.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise ReferenceCacheError(f"{final} already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {}
        for key, arr in (("turns", turns), ("totals", totals), ("counts", counts)):
            name, dtype = ARRAYS[key]
            with open(tmp / name, "wb") as f:
                np.save(f, np.ascontiguousarray(arr, dtype=dtype))
                f.flush()
                os.fsync(f.fileno())
            files[key] = {
                "file": name, "dtype": np.dtype(dtype).name, "shape": list(arr.shape),
                "bytes": (tmp / name).stat().st_size, "sha256": _sha256_file(tmp / name),
            }
        meta = dict(meta)
        meta.update(
            format=FORMAT_NAME, format_version=FORMAT_VERSION, files=files,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        old = final.parent / f"{final.name}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Reading + checks
# ----------------------------------------------------------------------------------------------


@dataclass
class ReferenceCache:
    """An opened, checked cache; arrays are read-only memory maps."""

    path: Path
    meta: dict[str, Any]
    turns: np.ndarray  # [N, T, 2] float64
    totals: np.ndarray  # [N, 2] float64
    counts: np.ndarray  # [N, T, 2] int32

    @property
    def mode(self) -> str:
        return str(self.meta["mode"])

    @property
    def num_samples(self) -> int:
        return int(self.meta["num_samples"])


@dataclass(frozen=True)
class Expectation:
    """What the run needs the cache to be; None fields are not checked."""

    data: str  # dataset prefix (for messages and the rebuild command)
    mode: str  # longpo | dpo
    dataset: dict[str, Any]  # fingerprint.dataset_identity of the run's dataset
    checkpoint: Optional[dict[str, Any]] = None  # CheckpointIdentity.to_json() of reference.load
    load: Optional[str] = None  # reference.load as given (rebuild command)
    rope_theta: Optional[float] = None  # reference.rope_theta override
    option: str = "reference.cache_path"


def read_meta(path: Path, exp: Expectation) -> dict[str, Any]:
    """meta.json of a complete cache, or ReferenceCacheError."""
    rebuild = rebuild_command(path, exp.data, exp.mode, exp.load, exp.rope_theta, option=exp.option)
    where = f"{exp.option}={path}"
    if not path.exists():
        partial = Path(str(path) + ".partial")
        hint = f" (an interrupted precompute left {partial}; re-run the same command to finish it)" if partial.exists() else ""
        raise ReferenceCacheError(f"{where} does not exist{hint}; build it with: {rebuild}")
    meta_file = path / META_FILE
    if not path.is_dir() or not meta_file.is_file():
        raise ReferenceCacheError(
            f"{where} is not a reference cache (no {META_FILE}; precompute writes it last, so the cache is "
            f"incomplete or this is another kind of file); rebuild it with: {rebuild}"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # An unreadable meta.json makes the cache of no use to anyone: rebuild it in place.
        stale = rebuild_command(path, exp.data, exp.mode, exp.load, exp.rope_theta, stale=True, option=exp.option)
        raise ReferenceCacheError(f"{meta_file} is corrupt (not valid JSON: {e}); rebuild the cache with: {stale}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ReferenceCacheError(f"{meta_file} is not a reference cache (format {meta.get('format') if isinstance(meta, dict) else None!r}); "
                                  f"rebuild it with: {rebuild}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ReferenceCacheError(
            f"{meta_file}: format version {meta.get('format_version')} is not the supported {FORMAT_VERSION}; "
            f"rebuild it with: {rebuild}"
        )
    return meta


def check_meta(path: Path, meta: dict[str, Any], exp: Expectation) -> None:
    """Mode, sample count, dataset, checkpoint and rope_theta of ``meta`` against the run."""
    load = exp.load or (meta.get("reference_checkpoint") or {}).get("path")
    rope = exp.rope_theta if exp.rope_theta is not None else meta.get("rope_theta_override")
    rebuild = rebuild_command(path, exp.data, exp.mode, load, rope, option=exp.option)
    # Built from this very dataset path / checkpoint path, whose content changed since: no input
    # that could still use the cache exists any more, so replacing it in place is safe.
    same_data = _same_path((meta.get("dataset") or {}).get("prefix"), exp.data)
    stale_rebuild = rebuild_command(path, exp.data, exp.mode, load, rope, stale=True, option=exp.option)
    head = f"reference cache {exp.option}={path}"
    if meta.get("mode") != exp.mode:
        raise ReferenceCacheError(
            f"{head} was computed for loss.mode={meta.get('mode')} but this run has loss.mode={exp.mode} "
            f"({'short contexts' if exp.mode == 'longpo' else 'long sequences'} are needed); rebuild it with: {rebuild}"
        )
    n_cache, n_data = meta.get("num_samples"), exp.dataset["num_samples"]
    if n_cache != n_data:
        raise ReferenceCacheError(
            f"{head} holds {n_cache} samples but data {exp.data} has {n_data}: it was built for another "
            f"dataset ({(meta.get('dataset') or {}).get('prefix')}); rebuild it with: "
            f"{stale_rebuild if same_data else rebuild}"
        )
    why = describe_dataset_mismatch(meta.get("dataset") or {}, exp.dataset)
    if why:
        raise ReferenceCacheError(f"{head} does not match data {exp.data}: {why}; rebuild it with: "
                                  f"{stale_rebuild if same_data else rebuild}")
    if exp.checkpoint is not None:
        cached = meta.get("reference_checkpoint") or {}
        if cached.get("fingerprint") != exp.checkpoint["fingerprint"]:
            if _same_path(cached.get("path"), exp.checkpoint["path"]) and same_data:
                rebuild = stale_rebuild  # the checkpoint at that path was replaced
            raise ReferenceCacheError(
                f"{head} was computed from another reference checkpoint: cache has {cached.get('path')} "
                f"(iteration {cached.get('iteration')}, fingerprint {str(cached.get('fingerprint'))[:12]}...), "
                f"reference.load is {exp.checkpoint['path']} (iteration {exp.checkpoint['iteration']}, fingerprint "
                f"{exp.checkpoint['fingerprint'][:12]}...); rebuild it with: {rebuild}"
            )
    if exp.rope_theta is not None:
        have = (meta.get("reference_model") or {}).get("rope_theta")
        if have is None or float(have) != float(exp.rope_theta):
            raise ReferenceCacheError(
                f"{head} was computed with reference rope_theta={have} but reference.rope_theta={exp.rope_theta}; "
                f"rebuild it with: {rebuild}"
            )


def _open_array(path: Path, key: str, meta: dict[str, Any], rebuild: str) -> np.ndarray:
    name, dtype = ARRAYS[key]
    f = path / name
    info = (meta.get("files") or {}).get(key)
    if not isinstance(info, dict):
        raise ReferenceCacheError(f"{path / META_FILE} does not describe {name}; rebuild the cache with: {rebuild}")
    if not f.is_file():
        raise ReferenceCacheError(f"{f} is missing; rebuild the cache with: {rebuild}")
    size = f.stat().st_size
    if size != info.get("bytes"):
        what = "truncated" if size < int(info.get("bytes") or 0) else "larger than written"
        raise ReferenceCacheError(
            f"{f} is {what} ({size} bytes, meta.json says {info.get('bytes')}); rebuild the cache with: {rebuild}"
        )
    if _sha256_file(f) != info.get("sha256"):
        raise ReferenceCacheError(f"{f} is corrupt (sha256 differs from meta.json); rebuild the cache with: {rebuild}")
    try:
        arr = np.load(f, mmap_mode="r")
    except ValueError as e:  # pragma: no cover - a matching sha256 makes this unreachable
        raise ReferenceCacheError(f"{f} is not a readable .npy file ({e}); rebuild the cache with: {rebuild}") from e
    if arr.dtype != np.dtype(dtype) or list(arr.shape) != info.get("shape"):
        raise ReferenceCacheError(
            f"{f} holds {arr.dtype} {list(arr.shape)}, expected {np.dtype(dtype).name} {info.get('shape')}; "
            f"rebuild the cache with: {rebuild}"
        )
    return arr


def open_cache(path: str | Path, exp: Expectation) -> ReferenceCache:
    """Open and check a cache against the run (see :class:`Expectation`); raises ReferenceCacheError."""
    p = Path(path)
    meta = read_meta(p, exp)
    check_meta(p, meta, exp)
    # The cache matches this run; its files are damaged: replacing it in place is safe.
    rebuild = rebuild_command(p, exp.data, exp.mode, exp.load or (meta.get("reference_checkpoint") or {}).get("path"),
                              exp.rope_theta if exp.rope_theta is not None else meta.get("rope_theta_override"),
                              stale=True, option=exp.option)
    arrays = {k: _open_array(p, k, meta, rebuild) for k in ARRAYS}
    n, t = int(meta["num_samples"]), int(meta["max_turns"])
    for key, shape in (("turns", (n, t, 2)), ("totals", (n, 2)), ("counts", (n, t, 2))):
        if arrays[key].shape != shape:
            raise ReferenceCacheError(
                f"{p / ARRAYS[key][0]} has shape {arrays[key].shape}, expected {shape} for {n} samples x {t} turns; "
                f"rebuild the cache with: {rebuild}"
            )
    if not np.isfinite(arrays["totals"]).all():
        bad = int((~np.isfinite(arrays["totals"])).any(axis=1).sum())
        raise ReferenceCacheError(f"{p / 'totals.npy'}: {bad} samples have no finite value; rebuild the cache with: {rebuild}")
    return ReferenceCache(path=p, meta=meta, **arrays)
