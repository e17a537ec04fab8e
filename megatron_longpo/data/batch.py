"""The micro-batch contract between the data pipeline, the model forward and the loss.

A micro-batch holds ``B`` preference pairs, laid out and padded, BEFORE the context-parallel
split (the step applies :func:`megatron_longpo.runtime.zigzag.zigzag_slice` to every [rows, S]
tensor along dim 1). ``S`` is a multiple of :func:`megatron_longpo.config.seq_length_multiple`.

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
