"""Which keys each local query may see: the block plan of the project's CP attention.

Everything here is pure integer arithmetic on host ints (no tensors, no process groups). This
module states the branch-attention rule once: the kernels run :func:`plan_blocks`, and the FLOP
count and the memory/step-time model ask :func:`attended_pairs` (derived from the same plan).

Global layout of one row (length S, positions in layout order)::

    [0, P)  prefix          [P, R) chosen branch     [R, S) rejected branch, then padding

``two_sequences`` rows have no branches: P = R = S. The rule (data/batch.py): causal in layout
order, except that rejected-branch tokens never see chosen-branch tokens. So a query at global
index t sees keys

    t <  R:  [0, t]                 (plain causal)
    t >= R:  [0, P) + [R, t]        (prefix, then its own branch causally)

Padding sits after the rejected branch and follows the rejected rule; its outputs are never used.

Under context parallelism the row is cut into 2*cp chunks of c = S/(2*cp) tokens and rank r holds
chunks r and 2*cp-1-r (zigzag; runtime/zigzag.py owns that arithmetic). Each held chunk is split
at R into at most two query blocks, and every block's allowed keys, concatenated in order, form
a LOWER-RIGHT causal pattern: with Lq queries and Lk concatenated keys, query i sees keys
0 .. Lk-Lq+i. That is the pattern flash attention and SDPA's ``causal_lower_right`` compute
without a mask, so no [S, S] (or [c, S]) mask is needed on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longpo.runtime.zigzag import zigzag_chunks


@dataclass(frozen=True)
class Block:
    """A contiguous run of local queries and the global key ranges it attends to.

    Attention is lower-right causal over the concatenation of ``kv_ranges``.
    """

    q_start: int  # local query index (this rank's zigzag order), inclusive
    q_end: int  # exclusive
    kv_ranges: tuple[tuple[int, int], ...]  # global [start, end) key ranges, in order

    @property
    def num_queries(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_keys(self) -> int:
        return sum(e - s for s, e in self.kv_ranges)


def plan_blocks(
    seq_len: int, cp_rank: int, cp_size: int, prefix_end: int | None = None, rejected_start: int | None = None
) -> list[Block]:
    """Blocks covering this rank's local queries exactly once, in local order.

    ``prefix_end`` (P) and ``rejected_start`` (R) describe a shared-prefix row; leave both None
    for a plain causal row.
    """
    if (prefix_end is None) != (rejected_start is None):
        raise ValueError("give both prefix_end and rejected_start, or neither")
    p = seq_len if prefix_end is None else int(prefix_end)
    r = seq_len if rejected_start is None else int(rejected_start)
    if not 0 <= p <= r <= seq_len:
        raise ValueError(f"need 0 <= prefix_end ({p}) <= rejected_start ({r}) <= seq_len ({seq_len})")
    blocks: list[Block] = []
    offset = 0
    for g0, g1 in zigzag_chunks(seq_len, cp_rank, cp_size):
        if g0 < r:  # causal part: queries [g0, min(g1, r))
            e = min(g1, r)
            blocks.append(Block(offset, offset + e - g0, ((0, e),)))
        if g1 > r:  # rejected part: queries [max(g0, r), g1)
            s = max(g0, r)
            ranges = tuple(x for x in ((0, p), (r, g1)) if x[1] > x[0])
            if p == r:  # no chosen branch: one contiguous range
                ranges = ((0, g1),)
            blocks.append(Block(offset + s - g0, offset + g1 - g0, ranges))
        offset += g1 - g0
    return blocks


def attended_pairs(prefix_end: int, rejected_start: int, end: int) -> int:
    """(query, key) pairs a row computes: queries [0, end) (padding excluded) under the rule.

    Counted from the single-rank plan, so it is exactly what the kernels compute (per block,
    lower-right causal: Lq queries over Lk keys see Lq*(Lk-Lq) + Lq*(Lq+1)/2 keys).
    """
    total = 0
    for blk in plan_blocks(end, 0, 1, prefix_end, rejected_start):
        q, k = blk.num_queries, blk.num_keys
        total += q * (k - q) + q * (q + 1) // 2
    return total


def allowed(t: int, k: int, prefix_end: int, rejected_start: int) -> bool:
    """The rule itself for one (query, key) pair of global indices (reference for tests)."""
    if k > t:
        return False
    if t >= rejected_start:
        return k < prefix_end or k >= rejected_start
    return True
