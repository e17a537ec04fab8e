"""Data-parallel sharded, seeded, resumable order of samples.

One global stream of sample indices is defined independently of the DP layout: epoch e is a
permutation of range(N) drawn from (seed, e) (identity when shuffle is off), and the epochs are
concatenated. Megatron semantics: ``consumed_samples`` counts samples over ALL data-parallel
ranks; each micro-step takes the next B * dp stream entries and DP rank r gets the r-th block of
B. Hence the ranks' shards are disjoint and together complete, epochs roll over without dropping
samples, and a run resumed from ``consumed_samples`` continues exactly the uninterrupted order.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class PreferenceSampler:
    """Infinite iterator over this DP rank's micro-batches (lists of B dataset indices)."""

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        seed: int,
        shuffle: bool = True,
        consumed_samples: int = 0,
    ):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0 (got {micro_batch_size})")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0 (got {consumed_samples})")
        self.num_samples = int(num_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(data_parallel_rank)
        self.dp_size = int(data_parallel_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.consumed_samples = int(consumed_samples)  # advanced by B * dp per micro-batch yielded
        self._perms: dict[int, np.ndarray] = {}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def global_order(self, start: int, count: int) -> np.ndarray:
        """Stream entries [start, start + count) (the same for every DP layout)."""
        out = np.empty(count, dtype=np.int64)
        pos, done = start, 0
        while done < count:
            epoch, off = divmod(pos, self.num_samples)
            take = min(count - done, self.num_samples - off)
            out[done : done + take] = self._epoch_order(epoch)[off : off + take]
            pos += take
            done += take
        return out

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        while True:
            start = self.consumed_samples + self.dp_rank * self.micro_batch_size
            batch = self.global_order(start, self.micro_batch_size)
            self.consumed_samples += step
            yield [int(i) for i in batch]
