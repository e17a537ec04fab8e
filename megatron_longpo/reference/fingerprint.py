"""Cheap identities of what a reference cache was computed from: the dataset and the checkpoint.

Both are computed from small files only, so the trainer can check a cache at start-up in
milliseconds, even for a 7B checkpoint and a dataset of billions of tokens:

- dataset: the preprocessing sidecar already holds a sha256 of every stored token (reference
  streams included, in sample order), a sha256 of the sample ids and the tokenizer fingerprint.
  They are kept as separate components so a mismatch can say WHICH one differs.
- checkpoint: its ``longpo_meta.json`` (model config, iteration, source; training state for a
  training checkpoint), the dist-checkpoint tensor metadata
  (``.metadata``: names, shapes, shards), and for every ``*.distcp`` data file its name, size and
  first/last 64 KiB. Any re-save or retrained weights change it; a moved directory does not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SAMPLE_BYTES = 64 * 1024  # bytes hashed at each end of every checkpoint data file


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------

# Components in the order a mismatch is reported (the first differing one is named).
DATASET_COMPONENTS = ("tokenizer_fingerprint", "ids_sha256", "bin_sha256")


def dataset_identity(meta: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Identity of a preprocessed dataset from its sidecar (``data.indexed.load_metadata``)."""
    ident = {
        "num_samples": int(meta["num_samples"]),
        "tokenizer_fingerprint": str(meta["tokenizer"]["fingerprint"]),
        "ids_sha256": str(meta["ids_sha256"]),
        "bin_sha256": str(meta["bin_sha256"]),
        "schema_version": int(meta["schema_version"]),
    }
    ident["fingerprint"] = _sha256_json(ident)
    ident["prefix"] = str(Path(prefix).resolve())  # informative: a moved dataset stays valid
    return ident


def describe_dataset_mismatch(cached: dict[str, Any], current: dict[str, Any]) -> str | None:
    """A sentence naming the first component that differs, or None when the identities agree."""
    if cached.get("fingerprint") == current["fingerprint"]:
        return None
    if cached.get("tokenizer_fingerprint") != current["tokenizer_fingerprint"]:
        return (
            f"the tokenizer differs (cache: {str(cached.get('tokenizer_fingerprint'))[:12]}..., dataset: "
            f"{current['tokenizer_fingerprint'][:12]}...); the data was tokenized for another model"
        )
    if cached.get("ids_sha256") != current["ids_sha256"]:
        return (
            f"the sample ids differ: the cache was built for another dataset ({cached.get('prefix')})"
        )
    if cached.get("bin_sha256") != current["bin_sha256"]:
        return (
            "the token content differs (same sample ids, other tokens: the dataset was re-preprocessed "
            "with other records, options or chat template)"
        )
    return f"the dataset fingerprint differs (cache {cached.get('fingerprint')}, dataset {current['fingerprint']})"


# ----------------------------------------------------------------------------------------------
# Checkpoint
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointIdentity:
    path: str  # resolved iteration directory (informative)
    iteration: int
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def short(self) -> str:
        return f"{self.path} (iteration {self.iteration}, fingerprint {self.fingerprint[:12]}...)"


def _file_sample(h: "hashlib._Hash", path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))


def checkpoint_fingerprint(iter_dir: Path, meta_file: str) -> str:
    """sha256 over the checkpoint's metadata files and samples of its data files (see module doc)."""
    h = hashlib.sha256()
    for name in (meta_file, ".metadata", "metadata.json"):
        p = iter_dir / name
        if p.is_file():
            h.update(f"{name}\0".encode())
            h.update(p.read_bytes())
    for p in sorted(iter_dir.glob("*.distcp")):
        _file_sample(h, p)
    return h.hexdigest()
