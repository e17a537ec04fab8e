"""What the training loop reads each step: this DP rank's micro-batches of the global batch,
laid out for the configured pair layout and carrying their reference log-probs."""

from __future__ import annotations

from typing import Any, Iterator, Optional


from megatron_longpo.config import LongPOConfig, seq_length_multiple
from megatron_longpo.data.batch import PairBatch
from megatron_longpo.data.indexed import (
    PreferenceDataset,
    check_dataset_fits,
    check_dataset_supports_mode,
    check_dataset_vocab,
    load_metadata,
)
from megatron_longpo.data.layout import build_pair_batch
from megatron_longpo.data.sampler import PreferenceSampler
from megatron_longpo.objectives import get_objective
from megatron_longpo.reference import open_reference
from megatron_longpo.runtime.distributed import ParallelGroups


class TrainingData:
    """Dataset + DP-sharded resumable sampler + reference source + layout, for one rank."""

    def __init__(self, cfg: LongPOConfig, groups: ParallelGroups, reference: Any, valid: Optional[PreferenceDataset]):
        self.cfg = cfg
        self.groups = groups
        self.dataset = PreferenceDataset(cfg.data.train_data)
        self.valid = valid
        self.reference = reference
        t = cfg.training
        self.num_micro_batches = t.global_batch_size // (t.micro_batch_size * groups.dp_size)
        # TE userbuffers (parallel.tp_comm_overlap) take one fixed shape: every row padded to max_seq_length
        self.pad_multiple = cfg.data.max_seq_length if cfg.parallel.tp_comm_overlap else seq_length_multiple(cfg.parallel)
        self._sampler: Optional[Iterator[list[int]]] = None
        self.set_consumed_samples(0)

    # -- properties the loop prints / uses ----------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def has_validation(self) -> bool:
        return self.valid is not None

    @property
    def reference_description(self) -> str:
        if not get_objective(self.cfg.loss.mode).needs_reference:
            return f"none ({self.cfg.loss.mode})"
        return getattr(self.reference, "description", type(self.reference).__name__)

    # -- batches -------------------------------------------------------------------------------
    def set_consumed_samples(self, consumed: int) -> None:
        t = self.cfg.training
        self._sampler = iter(PreferenceSampler(
            len(self.dataset), t.micro_batch_size, self.groups.dp_rank, self.groups.dp_size,
            seed=t.seed, shuffle=self.cfg.data.shuffle, consumed_samples=consumed,
        ))

    def _batch(self, dataset: PreferenceDataset, indices: list[int], reference: Any) -> PairBatch:
        samples = [dataset[i] for i in indices]
        objective = get_objective(self.cfg.loss.mode)
        batch = build_pair_batch(samples, self.cfg.data.pair_layout, self.pad_multiple, dataset.pad_id,
                                 self.cfg.loss.nll_target, nll_on=objective.nll_on or "chosen")
        if objective.needs_reference:  # else no reference, so no reward / ref metrics are logged
            batch.ref_chosen_logps, batch.ref_rejected_logps = reference.logps(indices)
        return batch

    def next_global_batch(self) -> list[PairBatch]:
        """This DP rank's micro-batches of the next global batch (Megatron sample order)."""
        assert self._sampler is not None
        return [self._batch(self.dataset, next(self._sampler), self.reference) for _ in range(self.num_micro_batches)]

    def validation_steps(self, eval_iters: int) -> tuple[int, int]:
        """(global batches, samples) one validation covers: ``eval_iters`` (0 = all) capped at the
        full global batches of the validation set, so no sample is counted twice."""
        if self.valid is None:
            return 0, 0
        full = len(self.valid) // self.cfg.training.global_batch_size
        steps = full if eval_iters == 0 else min(eval_iters, full)
        return steps, steps * self.cfg.training.global_batch_size

    def validation_batches(self, eval_iters: int) -> list[list[PairBatch]]:
        """The first :meth:`validation_steps` global batches of the validation set (fixed order)."""
        steps, _ = self.validation_steps(eval_iters)
        if steps == 0:
            return []
        t = self.cfg.training
        sampler = iter(PreferenceSampler(len(self.valid), t.micro_batch_size, self.groups.dp_rank,
                                         self.groups.dp_size, seed=t.seed, shuffle=False))
        ref = self.valid_reference
        return [[self._batch(self.valid, next(sampler), ref) for _ in range(self.num_micro_batches)]
                for _ in range(steps)]

    valid_reference: Any = None


def _check_dataset(cfg: LongPOConfig, prefix: str, option: str) -> dict:
    meta = load_metadata(prefix)
    check_dataset_supports_mode(meta, get_objective(cfg.loss.mode).reference_mode, option)
    check_dataset_fits(meta, cfg.data.pair_layout, cfg.data.max_seq_length, option)
    check_dataset_vocab(meta, cfg.model.vocab_size, option)
    return meta


def build_training_data(cfg: LongPOConfig, groups: ParallelGroups) -> TrainingData:
    """Open and check the dataset(s) and the reference source; nothing is trained yet."""
    _check_dataset(cfg, cfg.data.train_data, "data.train_data")
    valid = None
    if cfg.data.valid_data:
        _check_dataset(cfg, cfg.data.valid_data, "data.valid_data")
        valid = PreferenceDataset(cfg.data.valid_data)
    reference = valid_reference = None
    if get_objective(cfg.loss.mode).needs_reference:
        reference = open_reference(cfg, cfg.data.train_data, groups)
        if valid is not None:
            valid_reference = open_reference(cfg, cfg.data.valid_data, groups, split="valid", share_model_with=reference)
    data = TrainingData(cfg, groups, reference, valid)
    data.valid_reference = valid_reference
    return data
