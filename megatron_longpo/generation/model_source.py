"""``--model``: an HF directory, or a megatron_longpo checkpoint exported on the fly to a temp HF dir."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from megatron_longpo.checkpoint import resolve_checkpoint_dir
from megatron_longpo.checkpoint.format import CheckpointError
from megatron_longpo.config import ConfigError
from megatron_longpo.convert import convert_megatron_to_hf


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


@contextmanager
def resolved_model(model: str | Path, work_dir: Optional[str | Path] = None, progress: bool = True) -> Iterator[Path]:
    """Yield an HF model directory for ``model``; a Megatron checkpoint is converted (and removed after)."""
    # imported here: megatron-core is a heavy import that HF-directory and openai runs never need
    path = Path(model)
    if not path.exists():
        raise ConfigError(f"--model {path}: does not exist (an HF model directory or a megatron_longpo checkpoint)")
    if is_hf_dir(path):
        yield path
        return
    try:
        resolve_checkpoint_dir(path)
    except CheckpointError as e:
        raise ConfigError(
            f"--model {path}: neither an HF model directory (no config.json) nor a megatron_longpo checkpoint ({e})"
        ) from e
    tmp = Path(tempfile.mkdtemp(prefix="longpo-gen-model-", dir=str(work_dir) if work_dir else None))
    try:
        out = tmp / "hf"
        convert_megatron_to_hf(path, out, progress=progress)
        if not any(out.glob("tokenizer*")):
            raise ConfigError(
                f"--model {path}: the checkpoint has no tokenizer directory to export; generation needs one "
                "(save the run with its tokenizer, or convert it with tools/convert_megatron_to_hf.py --tokenizer-dir)"
            )
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
