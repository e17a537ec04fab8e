"""Durable small-file writes shared by datasets, caches and checkpoints."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory (a directory fsync makes a rename inside it durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temp file + rename: readers see old or new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
