"""LongPO loss: per-segment log-prob sums (vocab-parallel, chunked, CP-reduced) and the objective."""

from megatron_longpo.loss.logprobs import (
    SegmentSums,
    all_reduce_sum,
    segment_logprob_sums,
    vocab_parallel_target_logprobs,
)
from megatron_longpo.loss.longpo import METRIC_NAMES, REFERENCE_METRICS, longpo_loss, nll_term

__all__ = [
    "METRIC_NAMES",
    "REFERENCE_METRICS",
    "SegmentSums",
    "all_reduce_sum",
    "longpo_loss",
    "nll_term",
    "segment_logprob_sums",
    "vocab_parallel_target_logprobs",
]
