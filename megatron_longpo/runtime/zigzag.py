"""Zigzag context-parallel layout (Megatron-Core / TE convention).

A sequence of length S (S % (2*cp) == 0) is viewed as 2*cp equal chunks; CP rank r keeps chunks
r and 2*cp-1-r, so every rank gets the same amount of causal-attention work.
"""

from __future__ import annotations

import torch


def zigzag_indices(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions (LongTensor [S/cp]) held by ``cp_rank``, in local order."""
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not a multiple of 2*cp = {2 * cp_size}")
    c = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    j = 2 * cp_size - 1 - cp_rank
    second = torch.arange(j * c, (j + 1) * c, device=device)
    return torch.cat([first, second])


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
