"""Reference log-probs for training: from the cache (default) or from a frozen model (online).

training/data_provider.build_training_data opens the sources once, after the process groups exist
and before the first step (not at all for an objective without a reference, megatron_longpo/objectives.py), and fills each micro-batch from them::

    ref = open_reference(cfg, cfg.data.train_data, groups)    # prefix or dataset
    vref = open_reference(cfg, cfg.data.valid_data, groups,    # validation set: reference.valid_cache_path
                          split="valid", share_model_with=ref) # (online: reuse the one frozen model)
    w, l = ref.logps(sample_indices)                           # float64 [B] each, sums over turns
    batch = ref.attach(batch)                                  # the same, into a PairBatch via sample_index

Both sources return, per pair, the reference sums over turns as float64 [B] CPU tensors:
- ``CachedReference``: rows of the cache's totals.npy (memory-mapped), checked at open against
  the dataset, the mode, the reference checkpoint (when reference.load is set) and the RoPE
  override (cache.open_cache).
- ``OnlineReference``: a frozen reference model (reference.load, with ITS OWN model config) on the
  training's TP/CP groups computes the same values with the same code as the precompute
  (compute.compute_items), every call. ``logps`` / ``attach`` are then collective over the TP and
  CP groups: every rank of them must call it with the same samples (they hold the same
  micro-batch anyway); with expert parallelism also over the EP group, whose ranks call it at the
  same step with their own samples.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_longpo.config import ConfigError, LongPOConfig, seq_length_multiple, validate_model
from megatron_longpo.data.batch import PairBatch
from megatron_longpo.data.indexed import PreferenceDataset, check_dataset_supports_mode, load_metadata
from megatron_longpo.objectives import get_objective
from megatron_longpo.reference.cache import Expectation, ReferenceCache, ReferenceCacheError, open_cache, rebuild_command
from megatron_longpo.reference.compute import (
    DEFAULT_PAD_MULTIPLE,
    DEFAULT_TOKENS_PER_BATCH,
    compute_items,
    num_turn_slots,
    split_id,
    sum_turns,
)
from megatron_longpo.reference.fingerprint import dataset_identity
from megatron_longpo.reference.model import (
    ReferenceCheckpoint,
    effective_model_config,
    load_reference_model,
    read_reference_checkpoint,
)


class ReferenceSource(ABC):
    """Per-pair reference log-prob sums (over turns) for dataset samples."""

    mode: str  # "longpo" | "dpo"

    @abstractmethod
    def logps(self, sample_indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref_chosen [B], ref_rejected [B]) float64 CPU tensors for these dataset indices."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the start-up log."""

    @property
    def description(self) -> str:
        return self.describe()

    def attach(self, batch: PairBatch) -> PairBatch:
        """``batch`` with ref_chosen_logps / ref_rejected_logps filled from its sample_index."""
        if batch.sample_index is None:
            raise ValueError("PairBatch.sample_index is None: the reference source needs the dataset indices of the pairs")
        chosen, rejected = self.logps(batch.sample_index.tolist())
        return dataclasses.replace(batch, ref_chosen_logps=chosen, ref_rejected_logps=rejected)


def _as_indices(sample_indices: Sequence[int], n: int) -> np.ndarray:
    idx = np.asarray(list(sample_indices), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"sample indices {idx.tolist()} out of range for a dataset of {n} samples")
    return idx


class CachedReference(ReferenceSource):
    def __init__(self, cache: ReferenceCache):
        self.cache = cache
        self.mode = cache.mode

    def logps(self, sample_indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = _as_indices(sample_indices, self.cache.num_samples)
        rows = np.array(self.cache.totals[idx], dtype=np.float64)  # [B, 2] copy out of the mmap
        return torch.from_numpy(rows[:, 0].copy()), torch.from_numpy(rows[:, 1].copy())

    def describe(self) -> str:
        ck = self.cache.meta.get("reference_checkpoint") or {}
        return f"cache {self.cache.path} ({self.mode}, from {ck.get('path')} iteration {ck.get('iteration')})"


class OnlineReference(ReferenceSource):
    def __init__(self, model: torch.nn.Module, ckpt: ReferenceCheckpoint, model_cfg, dataset, groups, mode: str,
                 *, sequence_parallel: bool, chunk_size: int, pad_to_multiple: int,
                 tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH):
        self.model, self.ckpt, self.model_cfg = model, ckpt, model_cfg
        self.dataset, self.groups, self.mode = dataset, groups, mode
        self.turns = num_turn_slots(dataset, mode)
        self.sequence_parallel, self.chunk_size = sequence_parallel, chunk_size
        self.pad_to_multiple, self.tokens_per_batch = pad_to_multiple, tokens_per_batch

    def logps(self, sample_indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = _as_indices(sample_indices, len(self.dataset))
        uniq, inverse = np.unique(idx, return_inverse=True)  # a repeated sample is computed once
        T = self.turns
        items = []
        for i in uniq.tolist():
            n_turns = 1 if self.mode == "dpo" else int(self.dataset.num_turns[i])
            items += [(i * T + t) * 2 + side for t in range(n_turns) for side in (0, 1)]
        sums, _ = compute_items(
            self.model, self.dataset, items, self.mode, T, self.groups, vocab_size=self.model_cfg.vocab_size,
            tokens_per_batch=self.tokens_per_batch, pad_to_multiple=self.pad_to_multiple,
            sequence_parallel=self.sequence_parallel, chunk_size=self.chunk_size,
        )
        values = np.full((len(uniq), T, 2), np.nan, dtype=np.float64)  # [U, T, 2] as in the cache
        row = {int(i): u for u, i in enumerate(uniq.tolist())}
        for item, v in zip(items, sums):
            i, t, side = split_id(item, T)
            values[row[i], t, side] = v
        tot = sum_turns(values)[inverse.reshape(-1)]  # [B, 2]
        return torch.from_numpy(tot[:, 0].copy()), torch.from_numpy(tot[:, 1].copy())

    def describe(self) -> str:
        return (f"online {self.ckpt.identity.path} ({self.mode}, rope_theta={self.model_cfg.rope_theta}, "
                f"{self.model_cfg.params_dtype})")


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def _resolve_split(cfg: LongPOConfig, prefix: str, split: Optional[str]) -> str:
    if split is not None:
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        return split
    return "valid" if cfg.data.valid_data and prefix == cfg.data.valid_data and prefix != cfg.data.train_data else "train"


def check_reference_cache(
    cfg: LongPOConfig, dataset_prefix: str, split: Optional[str] = None, *, cache_path: Optional[str] = None
) -> ReferenceCache:
    """Open and check the cache of ``dataset_prefix`` (files only: usable before any process group).

    The cache is ``cache_path`` if given, else reference.cache_path (train split) or
    reference.valid_cache_path (``split='valid'``, or ``dataset_prefix == data.valid_data``).
    Raises ReferenceCacheError naming the mismatch and the command that rebuilds the cache.
    """
    split = _resolve_split(cfg, dataset_prefix, split)
    option = "reference.cache_path" if split == "train" else "reference.valid_cache_path"
    path = cache_path or (cfg.reference.cache_path if split == "train" else cfg.reference.valid_cache_path)
    mode, r = get_objective(cfg.loss.mode).reference_mode, cfg.reference
    if mode is None:
        raise ReferenceCacheError(f"loss.mode={cfg.loss.mode} uses no reference, so it has no reference cache")
    if not path:
        raise ReferenceCacheError(
            f"loss.mode={cfg.loss.mode} with reference.source=cache needs {option}; build the cache with: "
            f"{rebuild_command('CACHE', dataset_prefix, mode, r.load, r.rope_theta)} and set {option}=CACHE "
            "(or use reference.source=online with reference.load)"
        )
    meta = load_metadata(dataset_prefix)
    exp = Expectation(
        data=dataset_prefix, mode=mode, dataset=dataset_identity(meta, dataset_prefix),
        checkpoint=read_reference_checkpoint(r.load, "reference.load").identity.to_json() if r.load else None,
        load=r.load, rope_theta=r.rope_theta, option=option,
    )
    return open_cache(path, exp)


def open_reference(
    cfg: LongPOConfig,
    dataset,
    groups,
    *,
    cache_path: Optional[str] = None,
    split: Optional[str] = None,
    share_model_with: Optional[ReferenceSource] = None,
) -> Optional[ReferenceSource]:
    """The reference source of ``dataset`` (a PreferenceDataset or its prefix); None for an
    objective without a reference (loss.mode=sft, sft_rejected).

    Every check runs here, before any training step. source=cache: ``cache_path`` (default
    reference.cache_path, or reference.valid_cache_path for the validation set). source=online:
    builds and loads the frozen reference model (collective over the default group); pass
    ``share_model_with`` (the train split's source) to reuse its model for the validation set.
    """
    mode = get_objective(cfg.loss.mode).reference_mode  # the cache mode: longpo (short) or dpo (long)
    if mode is None:
        return None
    if isinstance(dataset, (str, Path)):
        dataset = PreferenceDataset(str(dataset))
    split = _resolve_split(cfg, dataset.prefix, split)
    check_dataset_supports_mode(dataset.meta, mode, option="data.train_data" if split == "train" else "data.valid_data")
    r = cfg.reference
    if r.source == "cache":
        return CachedReference(check_reference_cache(cfg, dataset.prefix, split, cache_path=cache_path))
    if r.source != "online":
        raise ConfigError(f"reference.source={r.source!r} is not one of ['cache', 'online']")
    if isinstance(share_model_with, OnlineReference):
        model, ckpt, model_cfg = share_model_with.model, share_model_with.ckpt, share_model_with.model_cfg
    else:
        if not r.load:
            raise ConfigError("reference.source=online needs reference.load (the reference checkpoint)")
        ckpt = read_reference_checkpoint(r.load, "reference.load")
        model_cfg = effective_model_config(ckpt, rope_theta=r.rope_theta)
        try:
            validate_model(model_cfg, cfg.parallel)
        except ConfigError as e:
            raise ConfigError(f"the reference model of reference.load={r.load} cannot run on this layout: {e}") from e
        model = load_reference_model(ckpt, model_cfg, cfg.parallel)
    return OnlineReference(
        model, ckpt, model_cfg, dataset, groups, mode,
        sequence_parallel=cfg.parallel.sequence_parallel, chunk_size=cfg.loss.logprob_chunk_size,
        pad_to_multiple=int(np.lcm(DEFAULT_PAD_MULTIPLE, seq_length_multiple(cfg.parallel))),
    )
