"""Collation of PreferenceSamples into a PairBatch (see batch.py for the contract; pair_layout.py
owns the layout names, rows per pair, row lengths and branch boundaries: the collation records
each row's boundaries and encodes ``branch_ids`` with :class:`PairLayout`).

``two_sequences``: rows 2B, row b = S_w of pair b, row B+b = S_l of pair b.
``shared_prefix``: rows B, row b = [prefix (P) | chosen branch (Lc) | rejected branch (Lr)] with
position ids 0..P-1 | P..P+Lc-1 | P..P+Lr-1. The last prefix position predicts the first token of
the branches (S_w[P] == S_l[P]); the last token of each branch has no target.
Both layouts give every response target the same context and the same position ids (tested by a
brute-force comparison in tests/unit/test_data_layout.py). The row length is padded up to a
multiple of ``pad_to_multiple`` (config.seq_length_multiple: 2*cp, x tp with SP, x16 per CP rank
with FP8); padding has pad_id tokens, branch id -1, no targets, and position ids that keep counting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_longpo.data.batch import CPSlice, PairBatch, cp_slice
from megatron_longpo.data.pair_layout import PairLayout, check_layout, rows_per_pair
from megatron_longpo.data.sample import PreferenceSample

NLL_TARGETS = ("sequence", "responses")


def _padded_length(longest: int, multiple: int, pad_to_length: Optional[int]) -> int:
    if multiple <= 0:
        raise ValueError(f"pad_to_multiple must be > 0 (got {multiple})")
    if pad_to_length is not None:
        if pad_to_length % multiple:
            raise ValueError(f"pad_to_length {pad_to_length} is not a multiple of {multiple}")
        if longest > pad_to_length:
            raise ValueError(f"a row needs {longest} tokens, more than pad_to_length {pad_to_length}")
        return pad_to_length
    return max(multiple, -(-longest // multiple) * multiple)


class _Rows:
    """numpy [rows, S] buffers in the PairBatch convention."""

    def __init__(self, rows: int, seq: int, pad_id: int):
        self.tokens = np.full((rows, seq), pad_id, dtype=np.int64)
        self.position_ids = np.tile(np.arange(seq, dtype=np.int64), (rows, 1))
        self.target_ids = np.zeros((rows, seq), dtype=np.int64)
        self.response_segment = np.full((rows, seq), -1, dtype=np.int64)
        self.nll_segment = np.full((rows, seq), -1, dtype=np.int64)

    def put(self, row: int, start: int, seq: np.ndarray, mask: np.ndarray, pos0: int,
            resp_seg: int, nll_seg: int, nll_all: bool, next_token: Optional[int] = None) -> int:
        """Place ``seq`` at [start, start+L) with positions pos0.. ; position t targets seq[t+1]
        (the last one targets ``next_token`` if given, else nothing). Returns the end column."""
        L = len(seq)
        end = start + L
        self.tokens[row, start:end] = seq
        self.position_ids[row, start:end] = np.arange(pos0, pos0 + L)
        tgt = np.asarray(seq[1:], dtype=np.int64)
        tmask = np.asarray(mask[1:], dtype=bool)
        if next_token is not None:
            tgt = np.append(tgt, next_token)
            tmask = np.append(tmask, False)  # the next token of the prefix is the branch start, never a response
        n = len(tgt)
        self.target_ids[row, start : start + n] = tgt
        self.response_segment[row, start : start + n] = np.where(tmask, resp_seg, -1)
        if nll_seg >= 0:
            self.nll_segment[row, start : start + n] = nll_seg if nll_all else np.where(tmask, nll_seg, -1)
        return end

    def pad_positions(self, row: int, start: int, pos0: int) -> None:
        """Padding positions continue counting from ``pos0``."""
        self.position_ids[row, start:] = np.arange(pos0, pos0 + self.tokens.shape[1] - start)

    def torch(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(getattr(self, k)) for k in
                ("tokens", "position_ids", "target_ids", "response_segment", "nll_segment")}


def build_pair_batch(
    samples: Sequence[PreferenceSample],
    layout: str,
    pad_to_multiple: int,
    pad_id: int,
    nll_target: str = "sequence",
    pad_to_length: Optional[int] = None,
    nll_on: str = "chosen",
) -> PairBatch:
    """Lay out B pairs; ``nll_target``: 'sequence' (every target of S_w, document included) or
    'responses' (chosen response targets only); ``nll_on='rejected'`` puts the NLL segment on S_l
    instead (SFT-Rejected). ``pad_to_length`` fixes S (else: longest row rounded up to
    ``pad_to_multiple``)."""
    check_layout(layout)
    if nll_target not in NLL_TARGETS:
        raise ValueError(f"nll_target {nll_target!r} is not one of {list(NLL_TARGETS)}")
    if nll_on not in ("chosen", "rejected"):
        raise ValueError(f"nll_on {nll_on!r} is not 'chosen' or 'rejected'")
    on_rejected = nll_on == "rejected"
    if not samples:
        raise ValueError("build_pair_batch needs at least one sample")
    B = len(samples)
    nll_all = nll_target == "sequence"
    if layout == "two_sequences":
        longest = max(s.two_sequences_length for s in samples)
        rows = _Rows(rows_per_pair(layout) * B, _padded_length(longest, pad_to_multiple, pad_to_length), pad_id)
        bounds = [(0, 0, 0)] * (2 * B)
        for b, s in enumerate(samples):
            nll_w, nll_l = (-1, b) if on_rejected else (b, -1)
            for row, seq, mask, nll in ((b, s.chosen, s.chosen_mask, nll_w), (B + b, s.rejected, s.rejected_mask, nll_l)):
                end = rows.put(row, 0, seq, mask, 0, row, nll, nll_all)
                rows.pad_positions(row, end, end)
                bounds[row] = (end, end, end)
    else:
        longest = max(s.shared_prefix_length for s in samples)
        rows = _Rows(rows_per_pair(layout) * B, _padded_length(longest, pad_to_multiple, pad_to_length), pad_id)
        bounds = []
        for b, s in enumerate(samples):
            P = s.prefix_length
            cb, rb = s.chosen_branch, s.rejected_branch
            assert cb[0] == rb[0], f"sample {s.id}: branches must start with the same token"
            end = rows.put(b, 0, s.prefix, np.zeros(P, np.uint8), 0, -1, b, nll_all, next_token=int(cb[0])) if P else 0
            r = rows.put(b, end, cb, s.chosen_branch_mask, P, b, -1 if on_rejected else b, nll_all)
            end = rows.put(b, r, rb, s.rejected_branch_mask, P, B + b, b if on_rejected else -1, nll_all)
            rows.pad_positions(b, end, P + len(rb))
            bounds.append((P, r, end))
    pair_layout = PairLayout.stack(layout, bounds)
    sample_index = torch.tensor([s.index for s in samples], dtype=torch.int64)
    return PairBatch(**rows.torch(), branch_ids=torch.from_numpy(pair_layout.branch_ids(rows.tokens.shape[1])), num_pairs=B,
                     layout=layout, sample_index=sample_index)


@dataclass
class ReferenceBatch:
    """Independent sequences, one per row, for reference log-prob sums (issue: reference cache)."""

    tokens: torch.Tensor  # [n, S] int64 (pad_id in padding)
    position_ids: torch.Tensor  # [n, S] int64, 0.. per row
    target_ids: torch.Tensor  # [n, S] int64 next token (0 where none)
    response_segment: torch.Tensor  # [n, S] int64: row index i where the target is a response token, else -1
    lengths: torch.Tensor  # [n] int64 unpadded lengths

    def for_cp_rank(self, cp_rank: int, cp_size: int) -> CPSlice:
        """This CP rank's slice (plain causal rows: attention_mask None, no NLL segments)."""
        return cp_slice(self, cp_rank, cp_size)


def build_reference_batch(
    ref_sequences: Sequence[tuple[np.ndarray, np.ndarray]],
    pad_to_multiple: int,
    pad_id: int,
    pad_to_length: Optional[int] = None,
) -> ReferenceBatch:
    """``ref_sequences``: (tokens [L], response mask [L]) pairs, e.g. from
    PreferenceSample.reference_sequences() (short context) or .long_sequences() (loss.mode=dpo)."""
    if not ref_sequences:
        raise ValueError("build_reference_batch needs at least one sequence")
    longest = max(len(t) for t, _ in ref_sequences)
    rows = _Rows(len(ref_sequences), _padded_length(longest, pad_to_multiple, pad_to_length), pad_id)
    for i, (toks, mask) in enumerate(ref_sequences):
        if len(toks) != len(mask):
            raise ValueError(f"reference sequence {i}: {len(toks)} tokens but {len(mask)} mask entries")
        end = rows.put(i, 0, toks, mask, 0, i, -1, False)
        rows.pad_positions(i, end, end)
    t = rows.torch()
    return ReferenceBatch(
        tokens=t["tokens"], position_ids=t["position_ids"], target_ids=t["target_ids"],
        response_segment=t["response_segment"],
        lengths=torch.tensor([len(x) for x, _ in ref_sequences], dtype=torch.int64),
    )


def pair_batches(
    dataset,
    sampler: Iterator[list[int]],
    layout: str,
    pad_to_multiple: int,
    nll_target: str = "sequence",
    pad_id: Optional[int] = None,
    pad_to_length: Optional[int] = None,
) -> Iterator[PairBatch]:
    """PairBatches of the sampler's micro-batches (indices into ``dataset``)."""
    pid = dataset.pad_id if pad_id is None else pad_id
    for indices in sampler:
        yield build_pair_batch([dataset[i] for i in indices], layout, pad_to_multiple, pid, nll_target, pad_to_length)
