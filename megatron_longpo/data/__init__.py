"""Preference data: record schema, chat templates, pair building, indexed dataset, sampler, layout.

Names are imported lazily so that light users (the sample-data script, the tokenizer) do not pay
for torch / megatron.core imports.
"""

import importlib
from typing import Any

_EXPORTS = {
    "PairBatch": "batch",
    "PreferenceDataset": "indexed",
    "check_dataset_fits": "indexed",
    "check_dataset_supports_mode": "indexed",
    "check_dataset_vocab": "indexed",
    "load_metadata": "indexed",
    "ReferenceBatch": "layout",
    "build_pair_batch": "layout",
    "build_reference_batch": "layout",
    "pair_batches": "layout",
    "LAYOUTS": "pair_layout",
    "PairLayout": "pair_layout",
    "PreferenceSample": "sample",
    "ReferenceTurn": "sample",
    "PreferenceSampler": "sampler",
    "DataError": "schema",
    "Tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatron_longpo.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatron_longpo.data' has no attribute {name!r}")
