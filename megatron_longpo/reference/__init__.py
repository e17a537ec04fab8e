"""Reference log-probs: cache format, precompute, cache checks and the online reference.

- :mod:`~megatron_longpo.reference.compute`     work items, batching plan, log-prob sums (shared code path)
- :mod:`~megatron_longpo.reference.cache`       on-disk format, atomic write, checks with rebuild command
- :mod:`~megatron_longpo.reference.fingerprint` dataset / checkpoint identities
- :mod:`~megatron_longpo.reference.model`       reference checkpoint + its own config, frozen model
- :mod:`~megatron_longpo.reference.precompute`  tools/precompute_reference.py (resumable, DP x TP)
- :mod:`~megatron_longpo.reference.source`      training side: open_reference -> ReferenceSource

Names are imported lazily so that light users (config checks) do not import torch / megatron.
"""

import importlib
from typing import Any

_EXPORTS = {
    "ReferenceCache": "cache",
    "ReferenceCacheError": "cache",
    "open_cache": "cache",
    "rebuild_command": "cache",
    "PrecomputeError": "precompute",
    "PrecomputeOptions": "precompute",
    "PrecomputeResult": "precompute",
    "precompute": "precompute",
    "CachedReference": "source",
    "OnlineReference": "source",
    "ReferenceSource": "source",
    "check_reference_cache": "source",
    "open_reference": "source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatron_longpo.reference.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatron_longpo.reference' has no attribute {name!r}")
