"""Zigzag context-parallel layout (Megatron-Core / TE convention): the one owner of its arithmetic.

A sequence of length S is viewed as 2*cp equal chunks; CP rank r keeps chunks r and 2*cp-1-r, so
every rank gets the same amount of causal-attention work. :func:`zigzag_chunks` is the chunk
arithmetic; the attention plan (models/attention/plan.py) and the batch slice (data/batch.py) ask
it. The divisibility rule it relies on is :func:`megatron_longpo.config.split_length_multiple`.
"""

from __future__ import annotations

import torch

from megatron_longpo.config import check_split_length


def zigzag_chunks(seq_len: int, cp_rank: int, cp_size: int) -> list[tuple[int, int]]:
    """Global [start, end) ranges held by ``cp_rank``, in local order."""
    if cp_size == 1:
        return [(0, seq_len)]
    check_split_length(seq_len, cp_size)
    c = seq_len // (2 * cp_size)
    j = 2 * cp_size - 1 - cp_rank
    return [(cp_rank * c, (cp_rank + 1) * c), (j * c, (j + 1) * c)]


def zigzag_indices(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions (LongTensor [S/cp]) held by ``cp_rank``, in local order."""
    return torch.cat([torch.arange(s, e, device=device) for s, e in zigzag_chunks(seq_len, cp_rank, cp_size)])


def zigzag_slice(t: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of ``t`` along ``dim`` (the sequence dim)."""
    if cp_size == 1:
        return t
    idx = zigzag_indices(t.shape[dim], cp_rank, cp_size, device=t.device)
    return t.index_select(dim, idx)


def zigzag_unslice(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`zigzag_slice` given every rank's part (rank order)."""
    cp = len(parts)
    if cp == 1:
        return parts[0]
    chunks = [None] * (2 * cp)
    for r, p in enumerate(parts):
        a, b = p.chunk(2, dim=dim)
        chunks[r], chunks[2 * cp - 1 - r] = a, b
    return torch.cat(chunks, dim=dim)
