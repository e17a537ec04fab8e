"""Rotary position embeddings from explicit position ids.

Megatron-Core's ``GPTModel`` ignores ``position_ids`` for RoPE: it builds the table for positions
0..S-1 and, under context parallelism, keeps this rank's zigzag chunks of that table. That is only
right when every row's positions are 0..S-1 in layout order. The shared-prefix layout gives the
rejected branch positions that continue from the prefix (P, P+1, ...), not from the end of the
chosen branch, so the project attention path computes the rotary angles from the CP-local position
ids instead. The result has exactly the layout Megatron's ``apply_rotary_pos_emb`` (bshd, unfused)
expects, with a per-row batch dim instead of a broadcast one:
``[s_local, b, 1, rot_dim]``, angles duplicated over the two halves (non-interleaved) or pairwise
(interleaved), as in ``RotaryEmbedding.get_emb``.

The angles are computed with the same fp32 ops as Megatron's table (positions cast to the dtype of
``inv_freq``, optional interpolation factor, outer product), so positions 0..S-1 give bit-identical
values.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, Optional

import torch


def rope_angles(
    inv_freq: torch.Tensor,  # [rot_dim / 2] (already llama3-scaled when the model uses it)
    position_ids: torch.Tensor,  # [b, s] int
    *,
    interpolation_factor: Optional[float] = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotary angles ``[s, b, 1, rot_dim]`` for explicit positions."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [batch, seq], got shape {tuple(position_ids.shape)}")
    inv_freq = inv_freq.to(position_ids.device)
    seq = position_ids.t().to(inv_freq.dtype)  # [s, b]
    if interpolation_factor is not None:
        seq = seq * (1 / interpolation_factor)
    freqs = seq.unsqueeze(-1) * inv_freq  # [s, b, rot_dim/2]
    if interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.unsqueeze(2)  # [s, b, 1, rot_dim]


def rope_from_module(rotary: torch.nn.Module, position_ids: torch.Tensor) -> torch.Tensor:
    """Angles for ``position_ids`` using the settings of a Megatron ``RotaryEmbedding`` module."""
    return rope_angles(
        rotary.inv_freq,
        position_ids,
        interpolation_factor=getattr(rotary, "seq_len_interpolation_factor", None),
        interleaved=bool(getattr(rotary, "rotary_interleaved", False)),
    )


# Rotary tables a model keeps (distinct padded lengths in flight: the current and the previous).
ROPE_CACHE_ENTRIES = 2


class BoundedRopeTable:
    """Per-module LRU of Megatron rotary tables, replacing ``RotaryEmbedding.forward``'s cache.

    Megatron-Core 0.16 decorates ``RotaryEmbedding.forward`` with a class-wide
    ``functools.lru_cache(maxsize=32)`` keyed by sequence length: with variable padded lengths a
    long-context run keeps up to 32 [S, 1, 1, d] fp32 tables on the GPU (GiBs at 512K) that are
    never freed. Installed as the module's ``forward``, this computes the same table with the
    undecorated function and keeps at most ``entries``. ``bypass()`` makes the call return None,
    for the project attention path, which computes its angles from position ids (rope_angles)
    and would otherwise build and discard a full table per micro-batch.
    """

    def __init__(self, rotary: torch.nn.Module, entries: int = ROPE_CACHE_ENTRIES) -> None:
        fn = type(rotary).forward
        self._fn = getattr(fn, "__wrapped__", fn)  # the function under lru_cache
        self._rotary = rotary
        self.entries = entries
        self.cache: OrderedDict = OrderedDict()
        self._bypass = False

    def __call__(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        if self._bypass:
            return None
        key = (max_seq_len, offset, packed_seq, id(cp_group) if cp_group is not None else None)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        table = self._fn(self._rotary, max_seq_len, offset, packed_seq, cp_group)
        self.cache[key] = table
        while len(self.cache) > self.entries:
            self.cache.popitem(last=False)
        return table

    @contextlib.contextmanager
    def bypass(self) -> Iterator[None]:
        self._bypass, prev = True, self._bypass
        try:
            yield
        finally:
            self._bypass = prev


def install_bounded_rope_cache(rotary: torch.nn.Module, entries: int = ROPE_CACHE_ENTRIES) -> BoundedRopeTable:
    """Give ``rotary`` (a Megatron RotaryEmbedding) a bounded table cache; returns it."""
    table = BoundedRopeTable(rotary, entries)
    rotary.forward = table  # instance attribute: nn.Module.__call__ dispatches to it
    return table
