"""Preference pairs as PairBatches for tests and checks, built two ways.

- :func:`synthetic_pair_batch`: random samples laid out by the real collation (data/layout.py).
- :func:`raw_pair_batch`: token lists laid out by hand, following the contract in data/batch.py and
  independent of data/layout.py, for tests that check the model, step and attention against it
  (random single- or multi-turn :class:`RawPair` from :func:`make_pairs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from megatron_longpo.data.batch import PairBatch
from megatron_longpo.data.layout import build_pair_batch
from megatron_longpo.data.sample import PreferenceSample


def synthetic_sample(prefix: int, response: int, vocab: int, seed: int = 0, index: int = 0) -> PreferenceSample:
    """One single-turn pair: ``prefix`` shared tokens, branches of ``response`` + 1 tokens."""
    rng = np.random.default_rng(seed)
    first = rng.integers(1, vocab, 1)
    chosen = np.concatenate([first, rng.integers(1, vocab, response)])
    rejected = np.concatenate([first, rng.integers(1, vocab, response)])
    mask = np.ones(response + 1, dtype=np.uint8)
    return PreferenceSample(
        id=f"synthetic-{seed}", prefix=rng.integers(1, vocab, prefix), chosen_branch=chosen,
        rejected_branch=rejected, chosen_branch_mask=mask, rejected_branch_mask=mask.copy(), index=index,
    )


def synthetic_pair_batch(layout: str, pairs: int, prefix: int, response: int, vocab: int, multiple: int = 1,
                         seed: int = 0) -> PairBatch:
    """``pairs`` synthetic pairs in ``layout`` with (fixed, seeded) reference log-probs."""
    samples = [synthetic_sample(prefix, response, vocab, seed + i, index=i) for i in range(pairs)]
    batch = build_pair_batch(samples, layout, multiple, pad_id=0)
    g = torch.Generator().manual_seed(seed)
    ref = lambda: -(2.0 * response + torch.rand(pairs, generator=g, dtype=torch.float64))  # noqa: E731
    return dataclasses.replace(batch, ref_chosen_logps=ref(), ref_rejected_logps=ref())


# ----------------------------------------------------------------------------------------------
# Hand-built pairs (independent of data/layout.py)
# ----------------------------------------------------------------------------------------------


@dataclass
class RawPair:
    """One preference pair as token lists: S_w = prefix + chosen, S_l = prefix + rejected."""

    prefix: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_resp: list[bool]  # per branch token: is it a response token
    rejected_resp: list[bool]


def random_pair(gen: torch.Generator, vocab: int, prefix_len: int, chosen_resps: list[int], rejected_resps: list[int],
                instr_len: int = 2) -> RawPair:
    """A (multi-turn when len(resps) > 1) pair; both branches start with the same non-response token.

    Branch = [t0] + resp_1 + instr_2 + resp_2 + ...; later instructions are shared text, the
    responses differ. Contract: the prefix ends one token before the first response token.
    """
    assert len(chosen_resps) == len(rejected_resps)

    def toks(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    prefix, t0 = toks(prefix_len), toks(1)
    instrs = [toks(instr_len) for _ in chosen_resps[1:]]

    def branch(resps: list[int]) -> tuple[list[int], list[bool]]:
        tokens, flags = list(t0), [False]
        for i, n in enumerate(resps):
            if i:
                tokens += instrs[i - 1]
                flags += [False] * instr_len
            tokens += toks(n)
            flags += [True] * n
        return tokens, flags

    c, cf = branch(chosen_resps)
    r, rf = branch(rejected_resps)
    return RawPair(prefix, c, r, cf, rf)


# Pair shapes: (prefix length, chosen response lengths, rejected response lengths) per pair.
# Prefix ends and branch starts avoid CP chunk boundaries (S=24: chunks of 6 at cp=2).
SINGLE_TURN = [(7, [5], [4]), (5, [3], [6])]
MULTI_TURN = [(6, [3, 2], [2, 3]), (3, [2, 2], [4, 1])]


def make_pairs(spec, vocab: int, seed: int) -> list[RawPair]:
    """One :func:`random_pair` per (prefix length, chosen resps, rejected resps) of ``spec``."""
    gen = torch.Generator().manual_seed(seed)
    return [random_pair(gen, vocab, p, c, r) for p, c, r in spec]


def raw_pair_batch(pairs: list[RawPair], layout: str, seq_len: int, nll_target: str = "sequence",
                   nll_on: str = "chosen") -> PairBatch:
    """Lay out ``pairs`` as a PairBatch (contract: megatron_longpo/data/batch.py) by hand.

    ``nll_target``: 'sequence' (every target of S_w) or 'responses' (chosen response targets);
    ``nll_on='rejected'``: the same on S_l instead (SFT-Rejected).
    Reference log-probs are fixed ramps; ``sample_index`` is 0..B-1.
    """
    if nll_target not in ("sequence", "responses"):
        raise ValueError(f"nll_target {nll_target!r} is not 'sequence' or 'responses'")
    B = len(pairs)
    rows = 2 * B if layout == "two_sequences" else B
    shape = (rows, seq_len)
    tokens = torch.zeros(shape, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    tgt = torch.zeros(shape, dtype=torch.long)
    resp = torch.full(shape, -1, dtype=torch.long)
    nll = torch.full(shape, -1, dtype=torch.long)
    branch = torch.full(shape, -1, dtype=torch.long)

    def put(row: int, start: int, seq: list[int], flags: list[bool], first_pos: int, bid: int, seg: int, nll_b: int,
            last_target=None):
        """Tokens seq at [start, start+len); position t targets seq[t+1] (or last_target at the end)."""
        n = len(seq)
        tokens[row, start : start + n] = torch.tensor(seq)
        pos[row, start : start + n] = torch.arange(first_pos, first_pos + n)
        branch[row, start : start + n] = bid
        for i in range(n):
            if i + 1 < n:
                nxt, is_resp = seq[i + 1], flags[i + 1]
            elif last_target is not None:
                nxt, is_resp = last_target
            else:
                continue
            tgt[row, start + i] = nxt
            if is_resp:
                resp[row, start + i] = seg
            if nll_b >= 0 and (nll_target == "sequence" or is_resp):
                nll[row, start + i] = nll_b

    for b, p in enumerate(pairs):
        P = len(p.prefix)
        if layout == "two_sequences":
            sw, sl = p.prefix + p.chosen, p.prefix + p.rejected
            assert max(len(sw), len(sl)) <= seq_len
            put(b, 0, sw, [False] * P + p.chosen_resp, 0, 0, b, -1 if nll_on == "rejected" else b)
            put(B + b, 0, sl, [False] * P + p.rejected_resp, 0, 0, B + b, b if nll_on == "rejected" else -1)
        else:
            assert P + len(p.chosen) + len(p.rejected) <= seq_len
            assert not p.chosen_resp[0] and p.chosen[0] == p.rejected[0]
            # The last prefix token predicts the first branch token (shared, not a response).
            put(b, 0, p.prefix, [False] * P, 0, 0, -1, b, last_target=(p.chosen[0], False))
            put(b, P, p.chosen, p.chosen_resp, P, 1, b, -1 if nll_on == "rejected" else b)
            put(b, P + len(p.chosen), p.rejected, p.rejected_resp, P, 2, B + b, b if nll_on == "rejected" else -1)
    return PairBatch(
        tokens=tokens, position_ids=pos, target_ids=tgt, response_segment=resp, nll_segment=nll,
        branch_ids=branch, num_pairs=B, layout=layout,
        ref_chosen_logps=torch.linspace(-30.0, -20.0, B, dtype=torch.float64),
        ref_rejected_logps=torch.linspace(-25.0, -35.0, B, dtype=torch.float64),
        sample_index=torch.arange(B),
    )


def select_pairs(batch: PairBatch, pairs: list[int]) -> PairBatch:
    """The two_sequences micro-batch of the given pairs of ``batch``, segment ids renumbered."""
    if batch.layout != "two_sequences":
        raise ValueError("select_pairs takes a two_sequences PairBatch")
    B, k = batch.num_pairs, len(pairs)
    rows = pairs + [B + p for p in pairs]
    resp = batch.response_segment[rows].clone()
    nll = batch.nll_segment[rows].clone()
    for i, p in enumerate(pairs):
        resp[batch.response_segment[rows] == p] = i
        resp[batch.response_segment[rows] == B + p] = k + i
        nll[batch.nll_segment[rows] == p] = i
    return PairBatch(
        tokens=batch.tokens[rows], position_ids=batch.position_ids[rows], target_ids=batch.target_ids[rows],
        response_segment=resp, nll_segment=nll, branch_ids=batch.branch_ids[rows], num_pairs=k,
        layout=batch.layout, ref_chosen_logps=batch.ref_chosen_logps[pairs],
        ref_rejected_logps=batch.ref_rejected_logps[pairs], sample_index=batch.sample_index[pairs],
    )
