"""On-disk layout of a megatron_longpo checkpoint and its metadata file.

    RUN/                                   a run (or converted-model) directory
      latest_checkpointed_iteration.txt    newest complete iteration, written last
      tokenizer/                           HF tokenizer files (+ generation_config.json)
      iter_0000000/                        one Megatron dist checkpoint (torch_dist format)
        longpo_meta.json                   format version, ModelConfig, source, tokenizer
        metadata.json, .metadata, common.pt, __*.distcp   (megatron.core.dist_checkpointing)

An iteration directory only gets its final name once it is complete (it is written as
``iter_N.tmp`` and renamed), and the latest pointer is updated after the rename, so a reader that
follows the pointer never sees a half-written checkpoint. The dist checkpoint stores every tensor
in its global (TP=1) shape, so it loads at any TP / CP size.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import megatron.core
import torch

from megatron_longpo.config import ConfigError, ModelConfig, from_dict
from megatron_longpo.fsutil import write_text_atomic  # noqa: F401  (re-exported)

FORMAT_NAME = "megatron_longpo"
FORMAT_VERSION = 1
META_FILE = "longpo_meta.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
TOKENIZER_DIR = "tokenizer"
_RESERVED = ("format", "format_version", "iteration", "model", "created", "versions")


class CheckpointError(ConfigError):
    """A checkpoint path or file is missing, incomplete, or does not fit the model."""


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass
class CheckpointMeta:
    """Contents of ``longpo_meta.json``.

    ``extra`` holds every other top-level key; the converter writes ``source`` (HF architecture,
    original config.json, dtype, path) and ``tokenizer`` (files, class); training may add its own.
    """

    iteration: int
    model: ModelConfig
    format_version: int = FORMAT_VERSION
    created: str = ""
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def source(self) -> Optional[dict]:
        return self.extra.get("source")

    @property
    def tokenizer(self) -> Optional[dict]:
        return self.extra.get("tokenizer")

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "iteration": self.iteration,
            "model": dataclasses.asdict(self.model),
            "created": self.created,
            "versions": self.versions,
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: dict, where: str) -> "CheckpointMeta":
        if data.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{where}: not a {FORMAT_NAME} checkpoint meta (format={data.get('format')!r})")
        version = int(data.get("format_version", -1))
        if version > FORMAT_VERSION or version < 1:
            raise CheckpointError(
                f"{where}: format_version {version} is not supported by this megatron_longpo "
                f"(reads 1..{FORMAT_VERSION}); upgrade the package"
            )
        try:
            model = from_dict(ModelConfig, data["model"], "model")
        except (KeyError, ConfigError) as e:
            raise CheckpointError(f"{where}: bad 'model' section: {e}") from e
        return cls(
            iteration=int(data["iteration"]),
            model=model,
            format_version=version,
            created=data.get("created", ""),
            versions=data.get("versions", {}),
            extra={k: v for k, v in data.items() if k not in _RESERVED},
        )


def new_meta(model: ModelConfig, iteration: int, extra: Optional[dict] = None) -> CheckpointMeta:
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra_meta may not set reserved keys {clash}")
    return CheckpointMeta(
        iteration=iteration,
        model=model,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions={"torch": torch.__version__, "megatron_core": megatron.core.__version__},
        extra=extra,
    )


def latest_iteration(run_dir: str | Path) -> Optional[int]:
    """Iteration named by the latest pointer of ``run_dir``, or None without a pointer."""
    p = Path(run_dir) / LATEST_FILE
    if not p.is_file():
        return None
    text = p.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{p}: expected an iteration number, found {text!r}") from None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The iteration directory for ``path``: a run dir (follows its latest pointer) or an iter dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if (p / META_FILE).is_file():
        return p
    it = latest_iteration(p)
    if it is not None:
        d = p / iter_dir_name(it)
        if not (d / META_FILE).is_file():
            raise CheckpointError(
                f"{p / LATEST_FILE} points to iteration {it} but {d / META_FILE} does not exist "
                "(checkpoint deleted or moved?)"
            )
        return d
    partial = sorted(x.name for x in p.glob("iter_*.tmp"))
    hint = f"; found incomplete save(s) {partial}" if partial else ""
    done = sorted(x.parent.name for x in p.glob("iter_*/" + META_FILE) if x.parent.name[5:].isdigit())
    if done:
        hint += (f"; it holds complete iteration(s) {done} but no {LATEST_FILE}: name one, e.g. {p / done[-1]} "
                 f"(or write its number into {p / LATEST_FILE})")
    raise CheckpointError(
        f"{p} is not a checkpoint: it has neither {META_FILE} (an iteration directory) nor "
        f"{LATEST_FILE} (a run directory){hint}"
    )


def read_meta(path: str | Path) -> CheckpointMeta:
    d = resolve_checkpoint_dir(path)
    f = d / META_FILE
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from e
    return CheckpointMeta.from_json(data, str(f))


def read_model_config(path: str | Path) -> ModelConfig:
    """ModelConfig of a checkpoint (run dir or iteration dir)."""
    return read_meta(path).model


def tokenizer_dir(path: str | Path) -> Optional[Path]:
    """The checkpoint's tokenizer directory (``RUN/tokenizer``), if there is one."""
    d = resolve_checkpoint_dir(path)
    for cand in (d / TOKENIZER_DIR, d.parent / TOKENIZER_DIR, Path(path) / TOKENIZER_DIR):
        if cand.is_dir():
            return cand
    return None
