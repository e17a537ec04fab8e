"""File names of a preprocessed dataset with prefix DIR/NAME (no heavy imports: the CLI checks
them before torch / megatron.core are loaded)."""

from __future__ import annotations

import os


def bin_path(prefix: str) -> str:
    return prefix + ".bin"  # == megatron.core.datasets.indexed_dataset.get_bin_path


def idx_path(prefix: str) -> str:
    return prefix + ".idx"  # == get_idx_path


def sidecar_path(prefix: str) -> str:
    return prefix + ".json"


def ids_path(prefix: str) -> str:
    return prefix + ".ids.json"


def rejected_path(prefix: str) -> str:
    return prefix + ".rejected.jsonl"


def dataset_files(prefix: str) -> list[str]:
    """All files of a complete dataset; the sidecar is last (it is renamed into place last)."""
    return [bin_path(prefix), idx_path(prefix), ids_path(prefix), sidecar_path(prefix)]


def prefix_hint(path: str) -> str:
    """For a missing dataset ``path`` that names one of a dataset's files (``NAME.bin``, ``.idx``,
    ``.json``, ``.ids.json``) of an existing dataset: the advice to pass its prefix instead; else ""."""
    for suffix in (".ids.json", ".rejected.jsonl", ".bin", ".idx", ".json"):
        prefix = path[: -len(suffix)]
        if path.endswith(suffix) and prefix and os.path.exists(sidecar_path(prefix)):
            return (f"; {path} is a file of the dataset {prefix}: pass the prefix {prefix} (no {suffix}), "
                    "as written by tools/preprocess_data.py --output-prefix")
    return ""
