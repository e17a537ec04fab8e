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

from typing import Optional

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
