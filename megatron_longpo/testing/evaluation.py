"""Evaluation test helpers."""

from __future__ import annotations

import hashlib
from pathlib import Path

from megatron_longpo.data.templates import get_template
from megatron_longpo.data.tokenizer import Tokenizer
from megatron_longpo.evaluation.haystack import FillerHaystack
from megatron_longpo.evaluation.prompts import TokenCounter, make_sample
from megatron_longpo.evaluation.tasks import TASK_NAMES


def task_samples_digest(tokenizer: str | Path, seed: int, length: int = 1000) -> str:
    """SHA-256 of the tokens of one sample of every synthetic task (filler haystack) at ``seed``:
    equal digests in two interpreters mean generation does not depend on the hash seed."""
    tok = Tokenizer(tokenizer)
    tpl, counter = get_template("auto", tok), TokenCounter(tok)
    h = hashlib.sha256()
    for task in TASK_NAMES:
        h.update(make_sample(task, length, seed, tpl, counter, FillerHaystack()).tokens.tobytes())
    return h.hexdigest()
