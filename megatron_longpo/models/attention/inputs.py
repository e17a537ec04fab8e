"""Model inputs of a PairBatch on one CP rank: tokens, position ids and the attention layout."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from megatron_longpo.data.batch import PairBatch
from megatron_longpo.models.attention.core import branch_layout_tensor
from megatron_longpo.runtime.distributed import ParallelGroups
from megatron_longpo.runtime.zigzag import zigzag_slice

LAYOUTS = ("two_sequences", "shared_prefix")


class AttentionInputs(NamedTuple):
    """Arguments of ``model(tokens, position_ids, attention_mask, ...)`` on this CP rank."""

    tokens: torch.Tensor  # [rows, S/cp] int64, zigzag slice
    position_ids: torch.Tensor  # [rows, S/cp] int64, zigzag slice (RoPE positions)
    attention_mask: Optional[torch.Tensor]  # None (causal rows) or branch layout int64 CPU [rows, 2]


def _runs(row: torch.Tensor) -> str:
    vals, counts = torch.unique_consecutive(row, return_counts=True)
    return " ".join(f"{int(v)}x{int(c)}" for v, c in zip(vals, counts))


def shared_prefix_layout(branch_ids: torch.Tensor) -> torch.Tensor:
    """Branch layout [rows, 2] = (prefix_end, rejected_start) from shared-prefix ``branch_ids``.

    Checks each row is ``0...0 1...1 2...2 -1...-1`` (prefix | chosen | rejected | padding).
    """
    ids = branch_ids.detach().to("cpu", torch.int64)
    rows, seq = ids.shape
    p = (ids == 0).sum(1)
    r = p + (ids == 1).sum(1)
    e = r + (ids == 2).sum(1)
    pos = torch.arange(seq).unsqueeze(0)
    expected = torch.where(pos < p[:, None], 0, torch.where(pos < r[:, None], 1, torch.where(pos < e[:, None], 2, -1)))
    bad = (expected != ids).any(1).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"PairBatch row {i}: shared_prefix branch_ids must be prefix (0), chosen branch (1), "
            f"rejected branch (2), then padding (-1), each one contiguous run; got runs "
            f"(value x count) {_runs(ids[i])}. The pair layout is built by the data pipeline "
            "(see megatron_longpo/data/batch.py)."
        )
    return branch_layout_tensor(p.tolist(), r.tolist())


def attention_inputs(batch: PairBatch, groups: ParallelGroups) -> AttentionInputs:
    """This CP rank's model inputs for ``batch`` (un-sliced, as the data pipeline returns it).

    ``two_sequences`` rows are plain causal (attention_mask None, also right for TE attention);
    ``shared_prefix`` rows carry their branch layout, which only the project attention accepts.
    """
    if batch.layout not in LAYOUTS:
        raise ValueError(f"PairBatch.layout must be one of {LAYOUTS}, got {batch.layout!r}")
    cp_rank, cp = groups.cp_rank, groups.cp_size
    seq = batch.seq_len
    if cp > 1 and seq % (2 * cp):
        raise ValueError(
            f"PairBatch sequence length {seq} is not a multiple of 2*cp = {2 * cp}; pad batches to "
            "megatron_longpo.config.seq_length_multiple(parallel)"
        )
    mask = shared_prefix_layout(batch.branch_ids) if batch.layout == "shared_prefix" else None
    return AttentionInputs(
        tokens=zigzag_slice(batch.tokens, cp_rank, cp, dim=1),
        position_ids=zigzag_slice(batch.position_ids, cp_rank, cp, dim=1),
        attention_mask=mask,
    )
