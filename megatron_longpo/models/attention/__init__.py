"""Context-parallel core attention with shared-prefix pair support (see docs/attention.md).

- :class:`ContextParallelAttention` / :class:`FlashContextParallelAttention`: Megatron core
  attention modules (drop-in for DotProductAttention) that run with any CP size on any device.
- :func:`attention_inputs`: a PairBatch -> (tokens, position_ids, attention_mask) on a CP rank.
- :func:`resolve_attention_backend` / :func:`core_attention_class`: backend selection.
"""

from megatron_longpo.models.attention.backend import core_attention_class, resolve_attention_backend
from megatron_longpo.models.attention.core import (
    ContextParallelAttention,
    FlashContextParallelAttention,
    attend_local,
    branch_layout_tensor,
    gather_global_sequence,
    row_layouts,
)
from megatron_longpo.models.attention.inputs import AttentionInputs, attention_inputs, shared_prefix_layout
from megatron_longpo.models.attention.plan import Block, allowed, local_chunks, plan_blocks

__all__ = [
    "AttentionInputs",
    "Block",
    "ContextParallelAttention",
    "FlashContextParallelAttention",
    "allowed",
    "attend_local",
    "attention_inputs",
    "branch_layout_tensor",
    "core_attention_class",
    "gather_global_sequence",
    "local_chunks",
    "plan_blocks",
    "resolve_attention_backend",
    "row_layouts",
    "shared_prefix_layout",
]
