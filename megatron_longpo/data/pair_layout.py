"""The pair layout: the one owner of layout names, rows per pair, row lengths and branch boundaries.

``two_sequences``: a pair is two rows, S_w = [prefix | chosen branch] and S_l = [prefix | rejected
branch]. ``shared_prefix``: a pair is one row [prefix | chosen branch | rejected branch]. Every
row is described by its boundaries (P, R, E): [0, P) prefix, [P, R) chosen branch, [R, E) rejected
branch, [E, S) padding; a ``two_sequences`` row is one whole sequence, P = R = E = its length.

Collation (data/layout.py) records the boundaries and encodes ``PairBatch.branch_ids`` with
:meth:`PairLayout.branch_ids`; the CP slice (data/batch.py) hands the model
:meth:`PairLayout.branch_bounds` as its attention layout; the FLOP count and the memory model ask
the boundaries. The attention rule over them is models/attention/plan.py. numpy only (no torch),
so preprocessing and its start-up checks use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

LAYOUTS = ("two_sequences", "shared_prefix")
_ROWS_PER_PAIR = {"two_sequences": 2, "shared_prefix": 1}


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"pair layout {layout!r} is not one of {list(LAYOUTS)} (data.pair_layout)")


def rows_per_pair(layout: str) -> int:
    """Model rows one preference pair takes: 2 (two_sequences) or 1 (shared_prefix)."""
    check_layout(layout)
    return _ROWS_PER_PAIR[layout]


def row_length(layout: str, prefix: Any, chosen: Any, rejected: Any) -> Any:
    """Unpadded row length a pair needs (ints, or numpy arrays elementwise): the longer of S_w and
    S_l for two_sequences, prefix + both branches for shared_prefix."""
    check_layout(layout)
    if layout == "two_sequences":
        return prefix + np.maximum(chosen, rejected) if isinstance(chosen, np.ndarray) else prefix + max(chosen, rejected)
    return prefix + chosen + rejected


def _runs(row: np.ndarray) -> str:
    change = np.flatnonzero(np.diff(row)) + 1
    starts = np.concatenate([[0], change])
    counts = np.diff(np.concatenate([starts, [len(row)]]))
    return " ".join(f"{int(row[s])}x{int(c)}" for s, c in zip(starts, counts))


@dataclass(frozen=True)
class PairLayout:
    """Boundaries of every row of a laid-out micro-batch (see the module docstring)."""

    name: str  # "two_sequences" | "shared_prefix"
    bounds: np.ndarray  # [rows, 3] int64: (prefix_end P, rejected_start R, end E)

    @classmethod
    def stack(cls, name: str, rows: Sequence[tuple[int, int, int]]) -> "PairLayout":
        check_layout(name)
        return cls(name, np.asarray(rows, dtype=np.int64).reshape(-1, 3))

    @classmethod
    def of_pair(cls, name: str, prefix: int, chosen: int, rejected: int) -> "PairLayout":
        """The rows of ONE pair with S_w = prefix + chosen tokens, S_l = prefix + rejected tokens."""
        if rows_per_pair(name) == 2:
            return cls.stack(name, [(prefix + chosen,) * 3, (prefix + rejected,) * 3])
        return cls.stack(name, [(prefix, prefix + chosen, prefix + chosen + rejected)])

    @classmethod
    def from_branch_ids(cls, name: str, branch_ids: np.ndarray) -> "PairLayout":
        """Decode ``branch_ids`` [rows, S] (the inverse of :meth:`branch_ids`), checking every row
        is ``0...0 1...1 2...2 -1...-1`` (two_sequences: ``0...0 -1...-1``)."""
        check_layout(name)
        ids = np.asarray(branch_ids, dtype=np.int64)
        p = (ids == 0).sum(1)
        r = p + (ids == 1).sum(1)
        e = r + (ids == 2).sum(1)
        layout = cls(name, np.stack([p, r, e], axis=1).astype(np.int64))
        bad = (layout.branch_ids(ids.shape[1]) != ids).any(1)
        if name == "two_sequences":
            bad |= e != p
        if bad.any():
            i = int(np.argmax(bad))
            parts = ("sequence (0), then padding (-1)" if name == "two_sequences" else
                     "prefix (0), chosen branch (1), rejected branch (2), then padding (-1)")
            raise ValueError(
                f"PairBatch row {i}: {name} branch_ids must be {parts}, each one contiguous run; got runs "
                f"(value x count) {_runs(ids[i])}. The pair layout is built by the data pipeline "
                "(see megatron_longpo/data/pair_layout.py)."
            )
        return layout

    @property
    def rows(self) -> int:
        return int(self.bounds.shape[0])

    @property
    def rows_per_pair(self) -> int:
        return rows_per_pair(self.name)

    def branch_ids(self, seq_len: int) -> np.ndarray:
        """[rows, S] int64: 0 prefix / whole sequence, 1 chosen branch, 2 rejected branch, -1 padding."""
        pos = np.arange(seq_len)[None, :]
        p, r, e = (self.bounds[:, i : i + 1] for i in range(3))
        return np.where(pos < p, 0, np.where(pos < r, 1, np.where(pos < e, 2, -1))).astype(np.int64)

    def num_tokens(self) -> int:
        """Non-padding tokens."""
        return int(self.bounds[:, 2].sum())

    def branch_bounds(self) -> Optional[np.ndarray]:
        """The attention layout: None for plain causal rows (two_sequences), else [rows, 2] int64
        (prefix_end, rejected_start) per row, what the project attention takes as attention_mask."""
        if self.name == "two_sequences":
            return None
        return np.ascontiguousarray(self.bounds[:, :2])
