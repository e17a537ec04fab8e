"""Answer filters: empty, degenerate repetition / too few real words, refusals.

Pure functions on text; ``check_pair`` returns the reason a (chosen, rejected) pair is dropped
(a key of the run summary) or None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

_WORD = re.compile(r"\w+", re.UNICODE)
_CONTENT_WORD = re.compile(r"[^\W\d_]{3,}", re.UNICODE)  # a word of 3+ letters

EMPTY = "empty_answer"
REPETITION = "repetitive_answer"
TOO_FEW_WORDS = "too_few_words"
REFUSAL = "refusal"


@dataclass(frozen=True)
class FilterConfig:
    max_repeat_ratio_chosen: float = 0.9  # drop when the repeated-word ratio is ABOVE this
    max_repeat_ratio_rejected: float = 0.95
    min_content_words: int = 2  # words of 3+ letters an answer needs
    refusal_phrases: tuple[str, ...] = ()


def repeated_word_ratio(text: str) -> float:
    """Share of word occurrences that repeat an earlier word: 1 - distinct/total (0 for no words)."""
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return 0.0
    return 1.0 - len(set(words)) / len(words)


def content_words(text: str) -> int:
    return len(_CONTENT_WORD.findall(text))


def find_refusal(text: str, phrases: Sequence[str]) -> Optional[str]:
    low = text.lower().replace("\u2019", "'")
    for p in phrases:
        if p.lower() in low:
            return p
    return None


def check_answer(text: str, max_repeat_ratio: float, cfg: FilterConfig) -> Optional[str]:
    if not text.strip():
        return EMPTY
    if find_refusal(text, cfg.refusal_phrases) is not None:
        return REFUSAL
    if content_words(text) < cfg.min_content_words:
        return TOO_FEW_WORDS
    if repeated_word_ratio(text) > max_repeat_ratio:
        return REPETITION
    return None


def check_pair(chosen: str, rejected: str, cfg: FilterConfig) -> Optional[str]:
    """Reason to drop the turn (checked on chosen first, then rejected), or None to keep it."""
    return check_answer(chosen, cfg.max_repeat_ratio_chosen, cfg) or check_answer(
        rejected, cfg.max_repeat_ratio_rejected, cfg
    )
