"""Training: per-micro-batch LongPO forward, Megatron-scheduled step, loop, optimizer, checkpoints.

Step names are imported lazily: light users (``tools/estimate_memory.py``, the memory and FLOP
models, ``--help`` of the entry points) must not pay for importing torch and megatron-core.
"""

import importlib
from typing import Any

_EXPORTS = ("StepResult", "average_metrics", "forward_backward", "microbatch_forward", "train_step")

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module("megatron_longpo.training.step"), name)
    raise AttributeError(f"module 'megatron_longpo.training' has no attribute {name!r}")
