"""An evaluation suite (tasks x lengths x samples), its scores and their aggregation.

:class:`Evaluator` is the API the CLI, the training loop and the self-evolution loop share:
build once (tokenizes every sample; fails fast on a bad task, length or haystack), then
``evaluate(model, groups)`` on any checkpoint / training step. Sample ``i`` of a task uses seed
``suite_seed * 100003 + i`` at every length, so the lengths of a suite ask the same questions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megatron_longpo.config import DEFAULT_LOGPROB_CHUNK_SIZE
from megatron_longpo.data.templates import ChatTemplate
from megatron_longpo.evaluation.haystack import Haystack
from megatron_longpo.evaluation.prompts import EvalSample, TokenCounter, make_sample
from megatron_longpo.evaluation.scoring import DEFAULT_TOKENS_PER_BATCH, SampleScore, score_sequences
from megatron_longpo.evaluation.stats import wilson_interval
from megatron_longpo.evaluation.tasks import TASK_NAMES, get_task
from megatron_longpo.runtime.distributed import ParallelGroups


@dataclass(frozen=True)
class SuiteSpec:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    samples: int = 8
    seed: int = 0

    def check(self, option: str = "evaluation") -> None:
        errs = []
        if not self.tasks:
            errs.append(f"{option}.tasks is empty; choose from {list(TASK_NAMES)}")
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        if bad:
            errs.append(f"{option}.tasks has unknown task(s) {bad}; choose from {list(TASK_NAMES)}")
        if not self.lengths or any(not isinstance(n, int) or n <= 0 for n in self.lengths):
            errs.append(f"{option}.lengths must be positive token counts, got {list(self.lengths)}")
        if self.samples <= 0:
            errs.append(f"{option}.samples must be > 0, got {self.samples}")
        if errs:
            raise ValueError("; ".join(errs))


def sample_seed(suite_seed: int, index: int) -> int:
    return suite_seed * 100003 + index


def build_samples(spec: SuiteSpec, template: ChatTemplate, counter: TokenCounter, haystack: Haystack,
                  progress: Optional[Callable[[int], None]] = None) -> list[EvalSample]:
    """Every (task, length, i) sample, in that order."""
    spec.check()
    out = []
    for task in spec.tasks:
        get_task(task)
        for length in spec.lengths:
            for i in range(spec.samples):
                out.append(make_sample(task, length, sample_seed(spec.seed, i), template, counter, haystack))
                if progress is not None:
                    progress(1)
    return out


@dataclass
class CellResult:
    """Scores of one (task, length) cell."""

    accuracy: float  # fraction of samples with a teacher-forced exact match of the whole answer
    token_accuracy: float  # fraction of answer tokens that are the argmax
    mean_loglik: float  # mean over samples of the answer log-likelihood (sum over its tokens)
    mean_token_loglik: float  # answer log-likelihood per answer token (pooled)
    num_samples: int
    mean_length: float  # tokens per sequence
    accuracy_ci: tuple[float, float] = (0.0, 1.0)  # 95% Wilson score interval of accuracy (binomial)


@dataclass
class EvalResult:
    results: dict[str, dict[int, CellResult]]  # task -> length -> cell
    mean_accuracy: dict[int, float]  # length -> mean over tasks
    seconds: float = 0.0
    per_sample: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat scalars for loggers: ``{task}/len{L}/accuracy``, ``.../loglik``, ``mean/len{L}/accuracy``."""
        out: dict[str, float] = {}
        for task, by_len in self.results.items():
            for length, c in by_len.items():
                out[f"{task}/len{length}/accuracy"] = c.accuracy
                out[f"{task}/len{length}/loglik"] = c.mean_loglik
        for length, acc in self.mean_accuracy.items():
            out[f"mean/len{length}/accuracy"] = acc
        return out

    def to_json(self) -> dict:
        return {
            "results": {t: {str(n): {**asdict(c), "accuracy_ci": list(c.accuracy_ci)} for n, c in by.items()}
                        for t, by in self.results.items()},
            "mean_accuracy": {str(n): a for n, a in self.mean_accuracy.items()},
            "seconds": round(self.seconds, 3),
            "samples": self.per_sample,
        }


def aggregate(samples: Sequence[EvalSample], scores: Sequence[SampleScore]) -> EvalResult:
    cells: dict[tuple[str, int], list[tuple[EvalSample, SampleScore]]] = {}
    for s, sc in zip(samples, scores):
        cells.setdefault((s.instance.task, s.length), []).append((s, sc))
    results: dict[str, dict[int, CellResult]] = {}
    for (task, length), items in cells.items():
        n_tok = sum(sc.num_tokens for _, sc in items)
        exact = sum(bool(sc.exact) for _, sc in items)
        results.setdefault(task, {})[length] = CellResult(
            accuracy=exact / len(items),
            accuracy_ci=wilson_interval(exact, len(items)),
            token_accuracy=sum(sc.matches for _, sc in items) / max(n_tok, 1),
            mean_loglik=float(np.mean([sc.loglik for _, sc in items])),
            mean_token_loglik=sum(sc.loglik for _, sc in items) / max(n_tok, 1),
            num_samples=len(items),
            mean_length=float(np.mean([len(s.tokens) for s, _ in items])),
        )
    lengths = sorted({n for by in results.values() for n in by})
    mean_acc = {n: float(np.mean([by[n].accuracy for by in results.values() if n in by])) for n in lengths}
    per_sample = [
        {"task": s.instance.task, "length": s.length, "seed": s.instance.seed, "tokens": int(len(s.tokens)),
         "exact": sc.exact, "loglik": sc.loglik, "answer_tokens": sc.num_tokens, "matches": sc.matches}
        for s, sc in zip(samples, scores)
    ]
    return EvalResult(results, mean_acc, per_sample=per_sample)


class Evaluator:
    """A built suite that scores models: ``Evaluator(...).evaluate(model, groups)``."""

    def __init__(self, samples: Sequence[EvalSample], *, vocab_size: int, pad_id: int, pad_multiple: int,
                 tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE,
                 sequence_parallel: bool = False):
        if not samples:
            raise ValueError("an Evaluator needs at least one sample")
        too_big = [s for s in samples if int(s.tokens.max()) >= vocab_size]
        if too_big:
            raise ValueError(f"evaluation prompts hold token id {int(too_big[0].tokens.max())} >= model.vocab_size "
                             f"{vocab_size}: the evaluation tokenizer does not belong to this model")
        self.samples = list(samples)
        self.kw = dict(vocab_size=vocab_size, pad_id=pad_id, pad_multiple=pad_multiple,
                       tokens_per_batch=tokens_per_batch, chunk_size=chunk_size, sequence_parallel=sequence_parallel)

    @property
    def total_tokens(self) -> int:
        return int(sum(len(s.tokens) for s in self.samples))

    def evaluate(self, model: torch.nn.Module, groups: ParallelGroups,
                 on_batch: Optional[Callable[[int], None]] = None) -> EvalResult:
        """Collective over the TP/CP/DP groups; the model is put in eval mode and restored."""
        t0 = time.time()
        was_training = model.training
        model.eval()
        try:
            scores = score_sequences(model, [(s.tokens, s.answer_mask) for s in self.samples], groups,
                                     on_batch=on_batch, **self.kw)
        finally:
            model.train(was_training)
        res = aggregate(self.samples, scores)
        res.seconds = time.time() - t0
        return res


def format_cell(c: CellResult) -> str:
    """``acc% [low-high]``: the accuracy and its 95% Wilson interval, in percent."""
    lo, hi = c.accuracy_ci
    return f"{100 * c.accuracy:.1f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def format_table(res: EvalResult) -> str:
    """Accuracy (%) per task and length with its 95% Wilson interval, plus the mean row."""
    lengths = sorted(res.mean_accuracy)
    w = max([len("task")] + [len(t) for t in res.results] + [4])
    cw = 20
    lines = ["task".ljust(w) + "".join(f"{n:>{cw}}" for n in lengths)]
    for task, by in res.results.items():
        lines.append(task.ljust(w) + "".join(f"{format_cell(by[n]):>{cw}}" if n in by else f"{'-':>{cw}}"
                                             for n in lengths))
    lines.append("mean".ljust(w) + "".join(f"{100 * res.mean_accuracy[n]:>{cw - 1}.1f}%" for n in lengths))
    return "\n".join(lines)

