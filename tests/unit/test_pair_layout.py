"""The pair layout owner (data/batch.py PairLayout) and the one CP slice (PairBatch.for_cp_rank)
against brute-force references: explicit zigzag chunk indices, a scan of branch ids, the
element-wise attention rule."""

import re
import typing

import numpy as np
import pytest
import torch

from megatron_longpo.config import DataConfig
from megatron_longpo.data.layout import build_pair_batch, build_reference_batch
from megatron_longpo.data.pair_layout import LAYOUTS, PairLayout, row_length, rows_per_pair
from megatron_longpo.data.sample import PreferenceSample
from megatron_longpo.models.attention.plan import allowed
from megatron_longpo.runtime.zigzag import zigzag_unslice
from megatron_longpo.training.flops import attended_pairs

FIELDS = ("tokens", "position_ids", "target_ids", "response_segment", "nll_segment")


def _sample(rng: np.random.Generator, index: int) -> PreferenceSample:
    first = rng.integers(1, 50, 1)
    chosen = np.concatenate([first, rng.integers(1, 50, int(rng.integers(1, 8)))])
    rejected = np.concatenate([first, rng.integers(1, 50, int(rng.integers(1, 8)))])
    return PreferenceSample(
        id=f"s{index}", prefix=rng.integers(1, 50, int(rng.integers(0, 9))), chosen_branch=chosen,
        rejected_branch=rejected, chosen_branch_mask=(rng.random(len(chosen)) < 0.7).astype(np.uint8),
        rejected_branch_mask=(rng.random(len(rejected)) < 0.7).astype(np.uint8), index=index,
    )


def _explicit_zigzag(seq: int, rank: int, cp: int) -> list[int]:
    c = seq // (2 * cp)
    return [i for i in range(seq) if i // c in (rank, 2 * cp - 1 - rank)]  # chunk r, then chunk 2cp-1-r


@pytest.mark.parametrize("layout", ["two_sequences", "shared_prefix"])
def test_for_cp_rank_is_the_zigzag_slice(layout):
    rng = np.random.default_rng(0)
    for trial in range(4):
        samples = [_sample(rng, trial * 3 + i) for i in range(3)]
        batch = build_pair_batch(samples, layout, pad_to_multiple=24, pad_id=0)
        placed = (batch.tokens != 0).sum(1).view(rows_per_pair(layout), -1)  # tokens are >= 1, pad_id 0
        for b, smp in enumerate(samples):
            need = row_length(layout, len(smp.prefix), len(smp.chosen_branch), len(smp.rejected_branch))
            assert int(placed[:, b].max()) == need
        assert batch.pair_layout().num_tokens() == int(placed.sum())
        for cp in (1, 2, 3, 4):
            parts = [batch.for_cp_rank(r, cp) for r in range(cp)]
            for r, part in enumerate(parts):
                idx = _explicit_zigzag(batch.seq_len, r, cp) if cp > 1 else list(range(batch.seq_len))
                for name in FIELDS:
                    assert torch.equal(getattr(part, name), getattr(batch, name)[:, idx]), (name, cp, r)
            for name in FIELDS:  # every rank's part put back together is the whole batch
                assert torch.equal(zigzag_unslice([getattr(p, name) for p in parts], dim=1), getattr(batch, name))
            expect = None
            if layout == "shared_prefix":
                expect = [[len(s.prefix), len(s.prefix) + len(s.chosen_branch)] for s in samples]
            for part in parts:  # the attention layout is the FULL rows', the same on every rank
                assert (part.attention_mask is None) == (expect is None)
                if expect is not None:
                    assert part.attention_mask.tolist() == expect and part.attention_mask.dtype == torch.int64


def test_reference_batch_for_cp_rank_is_the_zigzag_slice():
    rng = np.random.default_rng(1)
    seqs = [(rng.integers(1, 50, n), (rng.random(n) < 0.5).astype(np.uint8)) for n in (5, 17, 11)]
    batch = build_reference_batch(seqs, pad_to_multiple=24, pad_id=0)
    for cp in (2, 3):
        for r in range(cp):
            part = batch.for_cp_rank(r, cp)
            idx = _explicit_zigzag(batch.tokens.shape[1], r, cp)
            for name in ("tokens", "position_ids", "target_ids", "response_segment"):
                assert torch.equal(getattr(part, name), getattr(batch, name)[:, idx])
            assert part.attention_mask is None and part.nll_segment is None


def _scan(row: list[int]) -> tuple[bool, tuple[int, int, int]]:
    """Brute force: is the row 0* 1* 2* (-1)*, and where do its runs end?"""
    ok = re.fullmatch(r"0*1*2*3*", "".join("3" if v == -1 else str(v) for v in row)) is not None
    ends = [sum(1 for v in row if v in allowed_vals) for allowed_vals in ((0,), (0, 1), (0, 1, 2))]
    return ok, tuple(ends)


def test_pair_layout_boundaries_match_a_scan_of_branch_ids():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        seq = int(torch.randint(1, 12, (1,), generator=g))
        p, c, r = (int(x) for x in torch.randint(0, seq + 1, (3,), generator=g))
        valid = torch.tensor([[0] * p + [1] * c + [2] * r + [-1] * seq])[:, :seq]
        noisy = valid.clone()
        noisy[0, int(torch.randint(0, seq, (1,), generator=g))] = int(torch.randint(-1, 3, (1,), generator=g))
        for ids in (valid, noisy):
            ok, bounds = _scan(ids[0].tolist())
            if ok:
                lay = PairLayout.from_branch_ids("shared_prefix", ids)
                assert lay.bounds.tolist() == [list(bounds)]
                assert (lay.branch_ids(seq) == ids.numpy()).all()
                assert lay.num_tokens() == bounds[2]
            else:
                with pytest.raises(ValueError, match="row 0: shared_prefix branch_ids"):
                    PairLayout.from_branch_ids("shared_prefix", ids)
            two_ok = ok and bounds[0] == bounds[2]  # two_sequences rows have no branches
            if two_ok:
                assert PairLayout.from_branch_ids("two_sequences", ids).branch_bounds() is None
            else:
                with pytest.raises(ValueError, match="row 0: two_sequences branch_ids"):
                    PairLayout.from_branch_ids("two_sequences", ids)


def test_attended_pairs_match_the_rule_on_random_rows():
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        seq = int(torch.randint(1, 16, (1,), generator=g))
        p, r, e = sorted(int(x) for x in torch.randint(0, seq + 1, (3,), generator=g))
        brute = sum(allowed(t, k, p, r) for t in range(e) for k in range(e))
        assert attended_pairs(PairLayout.stack("shared_prefix", [(p, r, e)])) == brute


def test_layout_names_are_the_config_choices():
    assert typing.get_args(typing.get_type_hints(DataConfig)["pair_layout"]) == LAYOUTS


def test_of_pair_rows():
    assert PairLayout.of_pair("two_sequences", 5, 3, 4).bounds.tolist() == [[8, 8, 8], [9, 9, 9]]
    assert PairLayout.of_pair("shared_prefix", 5, 3, 4).bounds.tolist() == [[5, 8, 12]]
    with pytest.raises(ValueError, match="not one of"):
        PairLayout.of_pair("packed", 5, 3, 4)
