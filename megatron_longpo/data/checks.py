"""Start-up check of a dataset prefix for the trainer's preflight (before any process group)."""

from __future__ import annotations

from typing import Any

from megatron_longpo.config import ConfigError
from megatron_longpo.data.indexed import load_metadata
from megatron_longpo.data.schema import DataError


def check_dataset_files(prefix: str, option: str = "data.train_data") -> dict[str, Any]:
    """The sidecar of the complete dataset at ``prefix``; ConfigError naming ``option`` otherwise
    (missing, incomplete, wrong format or schema version, a data file missing)."""
    try:
        return load_metadata(prefix)
    except DataError as e:
        raise ConfigError(f"{option}={prefix}: {e}") from e
