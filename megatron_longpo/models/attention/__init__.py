"""Context-parallel core attention with shared-prefix pair support (see docs/attention.md).

- :class:`ContextParallelAttention` / :class:`FlashContextParallelAttention`: Megatron core
  attention modules (drop-in for DotProductAttention) that run with any CP size on any device.
- ``attention_mask``: None (causal rows) or a branch layout int64 CPU [rows, 2] (see core.py);
  the data side builds it (``PairBatch.for_cp_rank(...).attention_mask``, data/batch.py).
- :func:`resolve_attention_backend` / :func:`core_attention_class`: backend selection.
"""

from megatron_longpo.models.attention.backend import core_attention_class, resolve_attention_backend
from megatron_longpo.models.attention.core import (
    ContextParallelAttention,
    CudnnContextParallelAttention,
    FA3ContextParallelAttention,
    FlashContextParallelAttention,
    attend_local,
    branch_layout_tensor,
    gather_global_sequence,
    row_layouts,
)
from megatron_longpo.models.attention.plan import Block, allowed, attended_pairs, plan_blocks

__all__ = [
    "Block",
    "ContextParallelAttention",
    "CudnnContextParallelAttention",
    "FA3ContextParallelAttention",
    "FlashContextParallelAttention",
    "allowed",
    "attend_local",
    "attended_pairs",
    "branch_layout_tensor",
    "core_attention_class",
    "gather_global_sequence",
    "plan_blocks",
    "resolve_attention_backend",
    "row_layouts",
]
