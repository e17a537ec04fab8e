"""DP-sharded sampler: disjoint and complete shards, seeded shuffling, exact resume."""

import itertools

import numpy as np
import pytest

from megatron_longpo.data.sampler import PreferenceSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("B", [1, 3])
def test_shards_disjoint_and_complete_per_epoch(dp, B):
    N = 24  # a multiple of B*dp for every case: each epoch is exactly steps micro-steps
    steps = N // (B * dp)
    shards = [[i for mb in take(PreferenceSampler(N, B, r, dp, seed=7), steps) for i in mb] for r in range(dp)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(N))  # complete and disjoint
    for s in shards:
        assert len(s) == N // dp
    # epoch 2 is a different permutation, again complete
    shards2 = [[i for mb in take(PreferenceSampler(N, B, r, dp, seed=7), 2 * steps)[steps:] for i in mb]
               for r in range(dp)]
    assert sorted(i for s in shards2 for i in s) == list(range(N))
    assert shards2 != shards


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_union_of_ranks_is_the_global_stream(dp):
    """N not a multiple of B*dp: epochs roll over inside a micro-step, nothing is dropped."""
    N, B, steps = 11, 2, 9
    per_rank = [take(PreferenceSampler(N, B, r, dp, seed=3), steps) for r in range(dp)]
    merged = [i for k in range(steps) for r in range(dp) for i in per_rank[r][k]]
    ref = PreferenceSampler(N, B, 0, 1, seed=3)
    stream = ref.global_order(0, steps * B * dp)
    assert merged == list(stream)
    for e in range(len(stream) // N):  # every whole epoch is a permutation
        assert sorted(stream[e * N : (e + 1) * N]) == list(range(N))
    # the global order does not depend on dp
    assert list(PreferenceSampler(N, B, 0, 4, seed=3).global_order(0, 40)) == list(ref.global_order(0, 40))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_resume_equals_uninterrupted(dp):
    N, B, total, stop = 37, 2, 30, 11
    for r in range(dp):
        full = take(PreferenceSampler(N, B, r, dp, seed=5), total)
        first = PreferenceSampler(N, B, r, dp, seed=5)
        head = take(first, stop)
        assert first.consumed_samples == stop * B * dp  # counts samples over all DP ranks
        resumed = take(PreferenceSampler(N, B, r, dp, seed=5, consumed_samples=first.consumed_samples), total - stop)
        assert head + resumed == full


def test_seed_and_shuffle():
    a = PreferenceSampler(50, 1, 0, 1, seed=1).global_order(0, 50)
    b = PreferenceSampler(50, 1, 0, 1, seed=2).global_order(0, 50)
    assert sorted(a) == sorted(b) == list(range(50)) and list(a) != list(b)
    assert list(PreferenceSampler(50, 1, 0, 1, seed=1).global_order(0, 50)) == list(a)
    assert list(PreferenceSampler(50, 1, 0, 1, seed=1, shuffle=False).global_order(45, 10)) == \
        [45, 46, 47, 48, 49, 0, 1, 2, 3, 4]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="empty"):
        PreferenceSampler(0, 1, 0, 1, seed=0)
    with pytest.raises(ValueError, match="data_parallel_rank 2 not in"):
        PreferenceSampler(4, 1, 2, 2, seed=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        PreferenceSampler(4, 0, 0, 1, seed=0)
    assert np.array_equal(PreferenceSampler(4, 1, 0, 1, seed=0, shuffle=False).global_order(0, 4), np.arange(4))
