"""Synthetic long-context evaluation (RULER-style tasks) scored teacher-forced under TP/CP.

tasks.py (task instances from a seed) < haystack.py (filler / documents) < prompts.py (chat
template + tokenizer -> tokens, answer mask) < scoring.py (model forward, argmax / log-lik) <
suite.py (tasks x lengths x samples, Evaluator, aggregation) < setup.py (from config / CLI options)
< report.py (JSON, PNG plot) < cli.py (tools/evaluate.py; its torch-free parser: args.py).
See docs/evaluation.md. Names are imported lazily: ``--help`` of tools/evaluate.py loads no torch.
"""

import importlib
from typing import Any

_EXPORTS = {
    "FillerHaystack": "haystack", "get_haystack": "haystack",
    "EvalSample": "prompts", "TokenCounter": "prompts", "encode_instance": "prompts", "make_sample": "prompts",
    "SampleScore": "scoring", "score_sequences": "scoring",
    "EvalResult": "suite", "Evaluator": "suite", "SuiteSpec": "suite", "build_samples": "suite",
    "TASK_NAMES": "tasks", "TaskInstance": "tasks", "make_instance": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatron_longpo.evaluation.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatron_longpo.evaluation' has no attribute {name!r}")
