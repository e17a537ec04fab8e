"""Haystack text for the synthetic tasks: built-in filler or the user's documents, as sentences.

A haystack is consumed as a stream of sentences, each written with a leading space and tokenized
on its own (one chat-message part each), so the token count of a context is the sum of its
sentences' counts and a prompt can be filled to a token budget exactly, without re-tokenizing.

- Built-in filler: generated sentences over a fixed lowercase vocabulary (no digits, no upper-case
  words), so needle values, keys and variable names can never occur in it by accident.
- Documents (``from_files``): ``.txt`` / ``.md`` files (one document each) or ``.jsonl`` files
  (one document per line, field ``text`` or ``document``), split into sentences. A sentence that
  contains any of an instance's needle strings is skipped, so every needle and answer still
  occurs exactly once in the context.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

_SUBJECTS = ("the river", "the archive", "the committee", "the harbour", "the old mill", "the station",
             "the garden", "the winter fair", "the small library", "the north road", "the council", "the museum",
             "the valley", "the market", "the lighthouse", "the farm")
_VERBS = ("opened", "closed", "described", "visited", "repaired", "measured", "painted", "crossed", "recorded",
          "watched", "planned", "followed", "supplied", "welcomed", "moved past", "looked over")
_OBJECTS = ("a quiet street", "the stone bridge", "several boats", "the east wall", "a long report",
            "the tall grass", "a row of houses", "the morning train", "two wooden carts", "the last orchard",
            "a narrow path", "the public square", "an empty field", "the copper roof", "a warm kitchen")
_TAILS = ("before noon", "after the rain", "in early spring", "as usual", "without much noise", "once again",
          "near the water", "for the visitors", "during the storm", "at dusk", "with great care", "by hand")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def filler_sentence(rng: random.Random) -> str:
    """One built-in filler sentence, with a leading space."""
    text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
    return " " + text[0].upper() + text[1:]


class Haystack:
    """A deterministic sentence source: ``sentences(rng)`` yields an endless stream."""

    description: str = ""

    def sentences(self, rng: random.Random) -> Iterable[str]:
        raise NotImplementedError

    def fill(self, rng: random.Random, budget: int, num_tokens: Callable[[str], int],
             forbidden: Sequence[str] = ()) -> list[str]:
        """Sentences, in stream order, whose token counts sum to at most ``budget``.

        Stops at the first sentence that no longer fits (the context is then within one sentence
        of the budget); skips sentences that contain a ``forbidden`` string.
        """
        out: list[str] = []
        used = 0
        skipped = 0
        for s in self.sentences(rng):
            if any(f in s for f in forbidden):
                skipped += 1
                if skipped > 100_000:
                    raise ValueError(f"haystack {self.description}: almost every sentence contains a needle string")
                continue
            n = num_tokens(s)
            if used + n > budget:
                break
            out.append(s)
            used += n
        return out


class FillerHaystack(Haystack):
    description = "built-in filler"

    def sentences(self, rng: random.Random) -> Iterable[str]:
        while True:
            yield filler_sentence(rng)


class DocumentHaystack(Haystack):
    """Sentences of user documents, read in order from a random start sentence, wrapping around."""

    def __init__(self, sentences: Sequence[str], description: str):
        if not sentences:
            raise ValueError(f"haystack {description}: no sentences found (empty documents?)")
        self._sentences = list(sentences)
        self.description = description

    def sentences(self, rng: random.Random) -> Iterable[str]:
        n = len(self._sentences)
        start = rng.randrange(n)
        i = 0
        while True:
            yield self._sentences[(start + i) % n]
            i += 1


MAX_SENTENCE_WORDS = 64


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` with single spaces inside and one leading space each. Runs longer
    than MAX_SENTENCE_WORDS words (text without punctuation) are cut, so a context can always be
    filled to within a short piece of its budget."""
    out = []
    for para in text.split("\n"):
        for s in _SENTENCE_END.split(para.strip()):
            words = s.split()
            for i in range(0, len(words), MAX_SENTENCE_WORDS):
                out.append(" " + " ".join(words[i: i + MAX_SENTENCE_WORDS]))
    return out


def _documents(path: Path) -> Iterable[str]:
    if path.suffix == ".jsonl":
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
                text = rec.get("text", rec.get("document")) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: a haystack JSONL line needs a string field 'text' or 'document'")
                yield text
    else:
        yield path.read_text(encoding="utf-8")


def from_files(paths: Sequence[str | Path]) -> DocumentHaystack:
    """Haystack from files or directories (``*.txt``, ``*.md``, ``*.jsonl`` inside, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md", ".jsonl") and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"haystack file {p} does not exist")
    if not files:
        raise ValueError(f"haystack {list(map(str, paths))}: no .txt, .md or .jsonl files")
    sentences = [s for f in files for doc in _documents(f) for s in split_sentences(doc)]
    return DocumentHaystack(sentences, ", ".join(map(str, paths)))


def get_haystack(paths: Optional[Sequence[str | Path]]) -> Haystack:
    """Documents when ``paths`` is non-empty, else the built-in filler."""
    return from_files(paths) if paths else FillerHaystack()
