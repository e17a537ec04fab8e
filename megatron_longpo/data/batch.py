"""The micro-batch contract between the data pipeline, the model forward and the loss.

A micro-batch holds ``B`` preference pairs, laid out and padded, BEFORE the context-parallel
split: :meth:`PairBatch.for_cp_rank` is the one CP slice (Megatron's get_batch_on_this_cp_rank),
taken once per micro-batch after :meth:`PairBatch.validate`. ``S`` is a multiple of
:func:`megatron_longpo.config.seq_length_multiple`.

The pair layout (names, rows per pair, each row's branch boundaries) is owned by
data/pair_layout.py; :meth:`PairBatch.pair_layout` decodes ``branch_ids`` with it.

Layouts (``rows`` = number of model rows):
- ``two_sequences``: rows = 2B; row b is pair b's chosen sequence S_w, row B+b its rejected S_l.
- ``shared_prefix``: rows = B; row b is [prefix | chosen branch | rejected branch] where
  prefix = S_w[:P] (= S_l[:P]), chosen branch = S_w[P:], rejected branch = S_l[P:].
  P is one token before the first response token, so every response target lies in a branch
  and the token before each branch's first response token is the branch's first token.
  Position ids: prefix 0..P-1, chosen branch P..P+Lc-1, rejected branch P..P+Lr-1.
  Attention: causal in layout order, except rejected-branch tokens never see chosen-branch tokens.

Per-position tensors use "target positions": position t predicts ``target_ids[t]`` (the next token
of the SAME sequence/branch); positions with no target have segment -1.
Segments number log-prob sums of the micro-batch: chosen of pair b -> b, rejected of pair b -> B+b.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from megatron_longpo.config import check_split_length
from megatron_longpo.data.pair_layout import PairLayout, check_layout, rows_per_pair
from megatron_longpo.runtime.zigzag import zigzag_slice

_SEQ_FIELDS = ("tokens", "position_ids", "target_ids", "response_segment", "nll_segment", "branch_ids")


@dataclass
class CPSlice:
    """This CP rank's part of a micro-batch: what the model forward and the log-prob sums take."""

    tokens: torch.Tensor  # [rows, S/cp] int64, zigzag slice
    position_ids: torch.Tensor  # [rows, S/cp] int64 RoPE positions
    target_ids: torch.Tensor  # [rows, S/cp] int64
    response_segment: torch.Tensor  # [rows, S/cp] int64
    nll_segment: Optional[torch.Tensor]  # [rows, S/cp] int64 (None for reference batches: no NLL)
    attention_mask: Optional[torch.Tensor]  # None or branch layout int64 CPU [rows, 2] (GLOBAL indices)


def cp_slice(batch, cp_rank: int, cp_size: int, attention_mask: Optional[torch.Tensor] = None) -> CPSlice:
    """The CP slice of any laid-out batch (PairBatch, ReferenceBatch): its [rows, S] tensors
    zigzag-sliced along S, on the device they are on."""
    sl = lambda t: None if t is None else zigzag_slice(t, cp_rank, cp_size, dim=1)  # noqa: E731
    return CPSlice(
        tokens=sl(batch.tokens), position_ids=sl(batch.position_ids), target_ids=sl(batch.target_ids),
        response_segment=sl(batch.response_segment), nll_segment=sl(getattr(batch, "nll_segment", None)),
        attention_mask=attention_mask,
    )


@dataclass
class PairBatch:
    tokens: torch.Tensor  # [rows, S] int64 input ids (pad id in padding)
    position_ids: torch.Tensor  # [rows, S] int64 RoPE positions
    target_ids: torch.Tensor  # [rows, S] int64 next-token targets (0 where none)
    response_segment: torch.Tensor  # [rows, S] int64: 0..2B-1 if the target is a response token, else -1
    nll_segment: torch.Tensor  # [rows, S] int64: pair index b if the target counts in pair b's NLL, else -1
    branch_ids: torch.Tensor  # [rows, S] int64: 0 prefix / whole sequence, 1 chosen branch, 2 rejected branch, -1 padding
    num_pairs: int  # B
    layout: str  # "two_sequences" | "shared_prefix"
    ref_chosen_logps: Optional[torch.Tensor] = None  # [B] float64, summed over turns (cache)
    ref_rejected_logps: Optional[torch.Tensor] = None  # [B] float64
    sample_index: Optional[torch.Tensor] = None  # [B] int64 dataset indices (cache lookup, logging)

    def to(self, device) -> "PairBatch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return PairBatch(**kw)

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def num_tokens(self) -> int:
        """Non-padding tokens (for throughput accounting)."""
        return int((self.branch_ids >= 0).sum())

    def pair_layout(self) -> PairLayout:
        """The row boundaries, decoded from (and checked against) ``branch_ids`` on the host."""
        return PairLayout.from_branch_ids(self.layout, self.branch_ids.detach().cpu().numpy())

    def validate(self, cp_size: int = 1, tp_size: int = 1, sequence_parallel: bool = False) -> None:
        """Check this module's contract before any model work (the one batch check)."""
        check_layout(self.layout)
        rows, s = self.tokens.shape
        b = self.num_pairs
        expect_rows = rows_per_pair(self.layout) * b
        if rows != expect_rows:
            raise ValueError(f"PairBatch.tokens has {rows} rows; layout {self.layout} with {b} pairs needs {expect_rows}")
        for name in _SEQ_FIELDS:
            if getattr(self, name).shape != (rows, s):
                raise ValueError(f"PairBatch.{name} has shape {tuple(getattr(self, name).shape)}, expected {(rows, s)}")
        check_split_length(s, cp_size, tp_size, sequence_parallel)
        if int(self.response_segment.max()) >= 2 * b or int(self.nll_segment.max()) >= b:
            raise ValueError(
                f"PairBatch segment ids out of range: response_segment must be < 2B = {2 * b}, "
                f"nll_segment < B = {b} (got max {int(self.response_segment.max())} / {int(self.nll_segment.max())})"
            )
        self.pair_layout()  # branch runs

    def padded_to(self, seq_len: int) -> "PairBatch":
        """This batch with every row padded at the end to ``seq_len`` (pipeline stages exchange one
        shape per step). Padding has no target, no segment, branch -1 and positions that keep
        counting; it comes after every real token, so causal attention leaves real positions as
        they were."""
        s = self.seq_len
        if seq_len == s:
            return self
        if seq_len < s:
            raise ValueError(f"cannot pad a PairBatch of length {s} to {seq_len}")
        extra = seq_len - s

        def ext(t: torch.Tensor, value: Optional[int] = None) -> torch.Tensor:
            if value is None:  # continue each row: last position + 1, 2, ...
                tail = t[:, -1:] + torch.arange(1, extra + 1, dtype=t.dtype, device=t.device)
            else:
                tail = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
            return torch.cat([t, tail], dim=1)

        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update(tokens=torch.cat([self.tokens, self.tokens[:, -1:].expand(-1, extra)], dim=1),
                  position_ids=ext(self.position_ids), target_ids=ext(self.target_ids, 0),
                  response_segment=ext(self.response_segment, -1), nll_segment=ext(self.nll_segment, -1),
                  branch_ids=ext(self.branch_ids, -1))
        return PairBatch(**kw)

    def for_cp_rank(self, cp_rank: int, cp_size: int) -> CPSlice:
        """This CP rank's slice of every [rows, S] tensor (zigzag along S) and the attention layout
        of the FULL rows. Ids stay where they are (host), so the step plans without device syncs."""
        return cp_slice(self, cp_rank, cp_size, self.attention_mask())

    def attention_mask(self) -> Optional[torch.Tensor]:
        """The model's ``attention_mask`` for these FULL rows: None (causal rows, also right for TE
        attention) or the branch layout int64 CPU [rows, 2] (prefix_end, rejected_start) that the
        project attention understands (models/attention/core.py)."""
        bounds = self.pair_layout().branch_bounds()
        return None if bounds is None else torch.from_numpy(bounds)
