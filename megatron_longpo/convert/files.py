"""Output directories that appear only when complete, and the HF side files that travel along."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from megatron_longpo.convert.hf_config import ConversionError

# Small HF files that are not weights or config.json: the tokenizer and generation defaults.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)
SIDE_GLOBS = ("*.tiktoken",)


def check_output_dir(out: Path, flag: str) -> None:
    """Refuse an existing non-empty output before any work (never merge into old results)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{flag} {out} already exists and is not empty; remove it or choose another path")


@contextlib.contextmanager
def staged_dir(out: Path, flag: str) -> Iterator[Path]:
    """Yield a temp dir next to ``out``; rename it to ``out`` on success, delete it on error."""
    check_output_dir(out, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like a mkdir
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def side_files(src: Path) -> list[Path]:
    found = {src / n for n in SIDE_FILES if (src / n).is_file()}
    for g in SIDE_GLOBS:
        found.update(p for p in src.glob(g) if p.is_file())
    return sorted(found)


def tokenizer_files(src: Path) -> list[str]:
    """The side files of ``src`` that make a tokenizer (generation_config.json alone does not)."""
    return [f.name for f in side_files(src) if f.name != "generation_config.json"]


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer / generation files from ``src`` to ``dst``; returns their names."""
    files = side_files(src)
    if files:
        dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
    return [f.name for f in files]
