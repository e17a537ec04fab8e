"""Build an :class:`Evaluator` from the training config or the CLI's options (before any model work)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megatron_longpo.config import (
    DEFAULT_LOGPROB_CHUNK_SIZE,
    ConfigError,
    LongPOConfig,
    ParallelConfig,
    seq_length_multiple,
)
from megatron_longpo.data.indexed import load_metadata
from megatron_longpo.data.schema import DataError
from megatron_longpo.data.templates import ChatTemplate, get_template
from megatron_longpo.data.tokenizer import Tokenizer
from megatron_longpo.evaluation.haystack import get_haystack
from megatron_longpo.evaluation.prompts import TokenCounter
from megatron_longpo.evaluation.suite import Evaluator, SuiteSpec, build_samples

PAD_MULTIPLE = 64


@dataclass(frozen=True)
class SuiteOptions:
    """Everything that defines the evaluation prompts (the same for every checkpoint)."""

    tasks: Sequence[str]
    lengths: Sequence[int]
    samples: int
    seed: int
    tokenizer: str
    chat_template: str = "auto"
    haystack: Sequence[str] = ()
    tokens_per_batch: int = 32768


def text_pipeline(tokenizer: Optional[str], chat_template: str, data_prefix: Optional[str],
                  option: str) -> tuple[Tokenizer, ChatTemplate]:
    """Tokenizer + chat template: explicit, or the ones ``data_prefix`` was preprocessed with."""
    template_name = chat_template
    if tokenizer is None:
        if not data_prefix:
            raise ConfigError(f"{option}.tokenizer is not set and there is no dataset to take it from; set it")
        meta = load_metadata(data_prefix)
        tokenizer = meta["tokenizer"]["path"]
        if chat_template == "auto":
            template_name = meta.get("template", {}).get("name", "auto")
    try:
        tok = Tokenizer(tokenizer)
        return tok, get_template(template_name, tok)
    except DataError as e:
        raise ConfigError(f"{option}.tokenizer / {option}.chat_template: {e}") from e


def build_evaluator(o: SuiteOptions, tok: Tokenizer, template: ChatTemplate, *, vocab_size: int,
                    parallel: ParallelConfig, chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE, option: str = "evaluation",
                    progress: Optional[Callable[[int], None]] = None) -> Evaluator:
    """Tokenize every sample of the suite (errors name ``option``) and wrap it in an Evaluator."""
    spec = SuiteSpec(tuple(o.tasks), tuple(int(n) for n in o.lengths), int(o.samples), int(o.seed))
    try:
        spec.check(option)
        samples = build_samples(spec, template, TokenCounter(tok), get_haystack(list(o.haystack)), progress)
    except (ValueError, DataError, OSError) as e:
        raise ConfigError(f"{option}: {e}") from e
    pad = math.lcm(PAD_MULTIPLE, seq_length_multiple(parallel))
    try:
        return Evaluator(samples, vocab_size=vocab_size, pad_id=tok.pad_id, pad_multiple=pad,
                         tokens_per_batch=o.tokens_per_batch, chunk_size=chunk_size,
                         sequence_parallel=parallel.sequence_parallel)
    except ValueError as e:
        raise ConfigError(f"{option}: {e}") from e


def evaluator_from_config(cfg: LongPOConfig) -> Optional[Evaluator]:
    """The in-training evaluator of ``cfg.evaluation`` (None when no task is configured)."""
    e = cfg.evaluation
    if not e.tasks:
        return None
    tok, template = text_pipeline(e.tokenizer, e.chat_template, cfg.data.train_data, "evaluation")
    o = SuiteOptions(tasks=e.tasks, lengths=e.lengths, samples=e.samples, seed=e.seed, tokenizer=str(tok.path),
                     haystack=[e.haystack] if e.haystack else [], tokens_per_batch=e.tokens_per_batch)
    return build_evaluator(o, tok, template, vocab_size=cfg.model.vocab_size, parallel=cfg.parallel,
                           chunk_size=cfg.loss.logprob_chunk_size)
