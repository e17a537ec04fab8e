"""The micro-batch contract between the data pipeline, the model forward and the loss.

A micro-batch holds ``B`` preference pairs, laid out and padded, BEFORE the context-parallel
split: :meth:`PairBatch.for_cp_rank` is the one CP slice (Megatron's get_batch_on_this_cp_rank),
taken once per micro-batch after :meth:`PairBatch.validate`. ``S`` is a multiple of
:func:`megatron_longpo.config.seq_length_multiple`.

This module owns the pair layout: :data:`LAYOUTS`, :func:`rows_per_pair` and :class:`PairLayout`
(each row's branch boundaries). Collation (data/layout.py) encodes it, the attention reads its
``attention_mask()``, and the FLOP count / memory model ask it; the attention rule over those
boundaries is models/attention/plan.py.

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
from megatron_longpo.runtime.zigzag import zigzag_slice

LAYOUTS = ("two_sequences", "shared_prefix")
_ROWS_PER_PAIR = {"two_sequences": 2, "shared_prefix": 1}
_SEQ_FIELDS = ("tokens", "position_ids", "target_ids", "response_segment", "nll_segment", "branch_ids")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"pair layout {layout!r} is not one of {list(LAYOUTS)} (data.pair_layout)")


def rows_per_pair(layout: str) -> int:
    """Model rows one preference pair takes: 2 (two_sequences) or 1 (shared_prefix)."""
    check_layout(layout)
    return _ROWS_PER_PAIR[layout]


def _runs(row: torch.Tensor) -> str:
    vals, counts = torch.unique_consecutive(row, return_counts=True)
    return " ".join(f"{int(v)}x{int(c)}" for v, c in zip(vals, counts))


@dataclass(frozen=True)
class PairLayout:
    """Where each row's parts lie: [0, P) prefix, [P, R) chosen branch, [R, E) rejected branch,
    [E, S) padding. ``two_sequences`` rows are one whole sequence: P = R = E = its length."""

    name: str  # "two_sequences" | "shared_prefix"
    bounds: torch.Tensor  # [rows, 3] int64 CPU: (prefix_end P, rejected_start R, end E)

    @classmethod
    def of_pair(cls, name: str, prefix: int, chosen: int, rejected: int) -> "PairLayout":
        """The rows of ONE pair whose S_w = prefix + chosen and S_l = prefix + rejected tokens
        (shared_prefix: the branches are ``chosen`` and ``rejected`` tokens after the prefix)."""
        if rows_per_pair(name) == 2:
            rows = [[prefix + chosen] * 3, [prefix + rejected] * 3]
        else:
            rows = [[prefix, prefix + chosen, prefix + chosen + rejected]]
        return cls(name, torch.tensor(rows, dtype=torch.int64))

    @classmethod
    def stack(cls, name: str, rows: list[tuple[int, int, int]]) -> "PairLayout":
        return cls(name, torch.tensor(rows, dtype=torch.int64).reshape(-1, 3))

    @classmethod
    def from_branch_ids(cls, name: str, branch_ids: torch.Tensor) -> "PairLayout":
        """Decode PairBatch.branch_ids (the inverse of :meth:`branch_ids`), checking each row is
        ``0...0 1...1 2...2 -1...-1`` (two_sequences: ``0...0 -1...-1``)."""
        check_layout(name)
        ids = branch_ids.detach().to("cpu", torch.int64)
        p = (ids == 0).sum(1)
        r = p + (ids == 1).sum(1)
        e = r + (ids == 2).sum(1)
        layout = cls(name, torch.stack([p, r, e], dim=1))
        bad = (layout.branch_ids(ids.shape[1]) != ids).any(1)
        if name == "two_sequences":
            bad |= e != p
        rows = bad.nonzero().flatten().tolist()
        if rows:
            i = rows[0]
            parts = ("sequence (0), then padding (-1)" if name == "two_sequences" else
                     "prefix (0), chosen branch (1), rejected branch (2), then padding (-1)")
            raise ValueError(
                f"PairBatch row {i}: {name} branch_ids must be {parts}, each one contiguous run; got runs "
                f"(value x count) {_runs(ids[i])}. The pair layout is built by the data pipeline "
                "(see megatron_longpo/data/batch.py)."
            )
        return layout

    def branch_ids(self, seq_len: int) -> torch.Tensor:
        """[rows, S] int64: 0 prefix / whole sequence, 1 chosen branch, 2 rejected branch, -1 padding."""
        pos = torch.arange(seq_len).unsqueeze(0)
        p, r, e = (self.bounds[:, i : i + 1] for i in range(3))
        return torch.where(pos < p, 0, torch.where(pos < r, 1, torch.where(pos < e, 2, -1)))

    @property
    def rows_per_pair(self) -> int:
        return rows_per_pair(self.name)

    def num_tokens(self) -> int:
        """Non-padding tokens."""
        return int(self.bounds[:, 2].sum())

    def attention_mask(self) -> Optional[torch.Tensor]:
        """What the model takes as ``attention_mask``: None for plain causal rows (two_sequences,
        also right for TE attention), else the branch layout int64 CPU [rows, 2] = (P, R) that the
        project attention (models/attention/core.py) understands."""
        if self.name == "two_sequences":
            return None
        return self.bounds[:, :2].contiguous()


@dataclass
class CPSlice:
    """This CP rank's part of a micro-batch: what the model forward and the log-prob sums take."""

    tokens: torch.Tensor  # [rows, S/cp] int64, zigzag slice
    position_ids: torch.Tensor  # [rows, S/cp] int64 RoPE positions
    target_ids: torch.Tensor  # [rows, S/cp] int64
    response_segment: torch.Tensor  # [rows, S/cp] int64
    nll_segment: torch.Tensor  # [rows, S/cp] int64
    attention_mask: Optional[torch.Tensor]  # None or branch layout int64 CPU [rows, 2] (GLOBAL indices)


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
        return PairLayout.from_branch_ids(self.layout, self.branch_ids)

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

    def for_cp_rank(self, cp_rank: int, cp_size: int) -> CPSlice:
        """This CP rank's slice of every [rows, S] tensor (zigzag along S) and the attention layout
        of the FULL rows. Ids stay where they are (host), so the step plans without device syncs."""
        sl = lambda t: zigzag_slice(t, cp_rank, cp_size, dim=1)  # noqa: E731
        return CPSlice(
            tokens=sl(self.tokens), position_ids=sl(self.position_ids), target_ids=sl(self.target_ids),
            response_segment=sl(self.response_segment), nll_segment=sl(self.nll_segment),
            attention_mask=self.pair_layout().attention_mask(),
        )
