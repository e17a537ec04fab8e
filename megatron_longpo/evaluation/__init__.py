"""Synthetic long-context evaluation (RULER-style tasks) scored teacher-forced under TP/CP.

tasks.py (task instances from a seed) < haystack.py (filler / documents) < prompts.py (chat
template + tokenizer -> tokens, answer mask) < scoring.py (model forward, argmax / log-lik) <
suite.py (tasks x lengths x samples, Evaluator, aggregation) < setup.py (from config / CLI options)
< report.py (JSON, PNG plot) < cli.py (tools/evaluate.py). See docs/evaluation.md.
"""

from megatron_longpo.evaluation.haystack import FillerHaystack, get_haystack
from megatron_longpo.evaluation.prompts import EvalSample, TokenCounter, encode_instance, make_sample
from megatron_longpo.evaluation.scoring import SampleScore, score_sequences
from megatron_longpo.evaluation.suite import EvalResult, Evaluator, SuiteSpec, build_samples
from megatron_longpo.evaluation.tasks import TASK_NAMES, TaskInstance, make_instance

__all__ = [
    "TASK_NAMES", "EvalResult", "EvalSample", "Evaluator", "FillerHaystack", "SampleScore", "SuiteSpec",
    "TaskInstance", "TokenCounter", "build_samples", "encode_instance", "get_haystack", "make_instance",
    "make_sample", "score_sequences",
]
