"""Command line of tools/evaluate.py, importable without torch or megatron-core (``--help`` and
option errors answer at once; the evaluation itself lives in cli.py and loads torch after parsing)."""

from __future__ import annotations

import argparse
import re

from megatron_longpo.config import ATTENTION_BACKENDS, DEFAULT_LOGPROB_CHUNK_SIZE
from megatron_longpo.data.templates import TEMPLATE_CHOICES
from megatron_longpo.evaluation.tasks import TASK_NAMES

DEFAULT_TOKENS_PER_BATCH = 32768
_LENGTH = re.compile(r"([0-9]+)(k?)")


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_lengths(text: str) -> list[int]:
    """``4096,128k``: positive integers, optionally with one ``k`` (x1024); anything else is an error
    (``2kk``, ``inf``, ``1.5k``, ``-4``), never a silently different length."""
    out = []
    for t in csv_list(text):
        m = _LENGTH.fullmatch(t.lower())
        n = int(m.group(1)) * (1024 if m.group(2) else 1) if m else 0
        if n <= 0:
            raise argparse.ArgumentTypeError(
                f"{t!r} is not a token count: write a positive integer, optionally with k for x1024 (e.g. 4096 or 128k)")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} names no length (e.g. 4096,128k)")
    return out


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Score Megatron checkpoints on RULER-style synthetic long-context tasks (teacher-forced exact "
        "match of the answer and its log-likelihood; docs/evaluation.md). Run with torchrun.",
    )
    p.add_argument("--load", nargs="+", required=True, help="checkpoints (run or iteration directories), one line each in the plot")
    p.add_argument("--labels", default=None, help="comma-separated names of the checkpoints (default: dir@iteration)")
    p.add_argument("--tasks", type=csv_list, default=list(TASK_NAMES), help=f"comma-separated, from {','.join(TASK_NAMES)} (default: all)")
    p.add_argument("--lengths", type=parse_lengths, required=True, help="comma-separated prompt lengths in tokens, e.g. 4096,128k")
    p.add_argument("--samples", type=int, default=8, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0, help="seed of the task instances")
    p.add_argument("--tokenizer", default=None, help="tokenizer (.model file or HF dir); default: the checkpoint's tokenizer/")
    p.add_argument("--chat-template", choices=TEMPLATE_CHOICES, default="auto",
                   help="auto: the tokenizer's own template if it has one, else mistral (the same choice as preprocessing)")
    p.add_argument("--haystack", nargs="*", default=[], help="haystack documents (.txt/.md/.jsonl files or dirs); default: built-in filler")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (a forward-only pipeline schedule)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size (mixture-of-experts checkpoints: experts split over --ep ranks of the TP x CP x DP grid)")
    p.add_argument("--etp", type=int, default=None, help="tensor-parallel size inside each expert (default: --tp)")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto")
    p.add_argument("--rope-theta", type=float, default=None, help="override every checkpoint's RoPE base")
    p.add_argument("--params-dtype", choices=["fp32", "bf16"], default=None, help="override the checkpoints' dtype")
    p.add_argument("--tokens-per-batch", type=int, default=DEFAULT_TOKENS_PER_BATCH, help="padded tokens per forward")
    p.add_argument("--logprob-chunk-size", type=int, default=DEFAULT_LOGPROB_CHUNK_SIZE, help="positions per chunk of the vocab-parallel log-prob")
    p.add_argument("--output", required=True, help="results JSON to write")
    p.add_argument("--plot", default=None, help="PNG of accuracy vs length (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


