"""One tokenized preference sample, as built by preprocessing and as read back from disk.

A sample stores the policy pair in shared-prefix form (the document is stored once):

    S_w = prefix + chosen_branch        S_l = prefix + rejected_branch
    P   = len(prefix) = (index of the first response token of turn 1) - 1

so both branches start with the same token S_w[P] == S_l[P] (the last prompt token), and the
position predicting the first response token lies inside each branch. Masks mark response tokens
(assistant content + the EOS / end-of-turn token closing it); the prefix holds none.
Reference sequences are per turn, without history: [short_context_i ; I_i ; y_i].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_longpo.data.pair_layout import row_length


@dataclass
class ReferenceTurn:
    chosen: np.ndarray  # [L] token ids of [short_context_i ; I_i ; y_w,i] (template applied)
    chosen_mask: np.ndarray  # [L] 1 on response tokens
    rejected: np.ndarray  # [L'] [short_context_i ; I_i ; y_l,i]
    rejected_mask: np.ndarray  # [L']


@dataclass
class PreferenceSample:
    id: str
    prefix: np.ndarray  # [P] S_w[:P] == S_l[:P]
    chosen_branch: np.ndarray  # [Lc] S_w[P:]
    rejected_branch: np.ndarray  # [Lr] S_l[P:]
    chosen_branch_mask: np.ndarray  # [Lc] 1 on response tokens of S_w[P:]
    rejected_branch_mask: np.ndarray  # [Lr]
    references: list[ReferenceTurn] = field(default_factory=list)  # empty: no short context
    index: int = -1  # position in the dataset (-1 before writing)

    @property
    def prefix_length(self) -> int:
        return int(len(self.prefix))

    @property
    def chosen(self) -> np.ndarray:
        """S_w [P + Lc]."""
        return np.concatenate([self.prefix, self.chosen_branch])

    @property
    def rejected(self) -> np.ndarray:
        """S_l [P + Lr]."""
        return np.concatenate([self.prefix, self.rejected_branch])

    @property
    def chosen_mask(self) -> np.ndarray:
        return np.concatenate([np.zeros(len(self.prefix), self.chosen_branch_mask.dtype), self.chosen_branch_mask])

    @property
    def rejected_mask(self) -> np.ndarray:
        return np.concatenate([np.zeros(len(self.prefix), self.rejected_branch_mask.dtype), self.rejected_branch_mask])

    @property
    def two_sequences_length(self) -> int:
        """Row length the pair needs in the two_sequences layout: max(len S_w, len S_l)."""
        return row_length("two_sequences", self.prefix_length, len(self.chosen_branch), len(self.rejected_branch))

    @property
    def shared_prefix_length(self) -> int:
        """Row length in the shared_prefix layout: P + Lc + Lr."""
        return row_length("shared_prefix", self.prefix_length, len(self.chosen_branch), len(self.rejected_branch))

    @property
    def num_turns(self) -> int:
        return len(self.references)

    def reference_sequences(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, response mask) of the short-context reference sequences, in the order
        turn 0 chosen, turn 0 rejected, turn 1 chosen, ... (sum chosen / rejected per sample)."""
        out = []
        for t in self.references:
            out.append((t.chosen, t.chosen_mask))
            out.append((t.rejected, t.rejected_mask))
        return out

    def long_sequences(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, response mask) of S_w and S_l (the reference inputs of loss.mode=dpo)."""
        return [(self.chosen, self.chosen_mask), (self.rejected, self.rejected_mask)]

    def check(self) -> None:
        """Invariants of the shared-prefix form (raises AssertionError with the sample id)."""
        cb, rb = self.chosen_branch, self.rejected_branch
        assert len(cb) >= 2 and len(rb) >= 2, f"sample {self.id}: a branch needs its first token and a response"
        assert cb[0] == rb[0], f"sample {self.id}: branches must start with the same (last prompt) token"
        assert not self.chosen_branch_mask[0] and not self.rejected_branch_mask[0], f"sample {self.id}: P too late"
        assert self.chosen_branch_mask[1] and self.rejected_branch_mask[1], f"sample {self.id}: P is not the first response - 1"
        assert len(self.chosen_branch_mask) == len(cb) and len(self.rejected_branch_mask) == len(rb)
