"""Synthetic preference pairs laid out by the real collation (data/layout.py), for tests and checks."""

from __future__ import annotations

import dataclasses

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
