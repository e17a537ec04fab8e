"""File names of a preprocessed dataset with prefix DIR/NAME (no heavy imports: the CLI checks
them before torch / megatron.core are loaded)."""

from __future__ import annotations


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
