"""Questions: parsing the model's numbered list, the prefix phrases, and the ``--questions`` pool."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from megatron_longpo.config import ConfigError

# "1. text", "1) text", "1: text", "Q1. text", "Question 1: text", "**1.** text", "### 1. text"
_ITEM = re.compile(
    r"^\s*(?:[#>*-]+\s*)?(?:\*\*)?\s*(?:Q(?:uestion)?\s*)?(\d{1,2})\s*[.):]\s*(?:\*\*)?\s*(.*)$",
    re.IGNORECASE,
)


class QuestionParseError(ValueError):
    """The model's output is not a numbered list of exactly the requested number of questions."""


def parse_questions(text: str, expected: int) -> list[str]:
    """The ``expected`` questions of a numbered list, numbered 1..expected in order.

    Text before item 1 (a preamble such as "Here are four questions:") is ignored; lines after an
    item that do not start a new item continue it (wrapped questions). Raises
    QuestionParseError for too few / too many items, numbering gaps or repeats, and empty items.
    """
    items: list[tuple[int, list[str]]] = []
    for line in text.splitlines():
        m = _ITEM.match(line)
        if m:
            items.append((int(m.group(1)), [m.group(2).strip()]))
        elif items and line.strip():
            items[-1][1].append(line.strip())
    if not items:
        raise QuestionParseError("no numbered items")
    numbers = [n for n, _ in items]
    if numbers != list(range(1, len(items) + 1)):
        raise QuestionParseError(f"items numbered {numbers}, expected 1..{expected} in order")
    if len(items) != expected:
        raise QuestionParseError(f"{len(items)} items, expected {expected}")
    out = []
    for n, parts in items:
        q = " ".join(p for p in parts if p).strip().strip("*").strip()
        if not q:
            raise QuestionParseError(f"item {n} is empty")
        out.append(q)
    return out


def with_prefix(question: str, prefixes: Sequence[str], rng: random.Random) -> str:
    """``question`` behind one phrase drawn from ``prefixes`` (unchanged when there are none)."""
    if not prefixes:
        return question
    prefix = rng.choice(list(prefixes)).strip()
    q = question.strip()
    # "As described ..., What is X?" -> "As described ..., what is X?" unless the word is an acronym/name
    if len(q) > 1 and q[0].isupper() and q[1].islower() and q.split(" ", 1)[0] in _LOWER_OK:
        q = q[0].lower() + q[1:]
    return f"{prefix} {q}"


_LOWER_OK = {"What", "Which", "Who", "Whom", "Whose", "Why", "How", "When", "Where", "In", "To", "Describe",
             "Explain", "Discuss", "Identify", "Compare", "Analyze", "Analyse", "Summarize", "Summarise",
             "Is", "Are", "Does", "Do", "Did", "Can", "Could", "Should", "Would", "According", "Based"}


@dataclass(frozen=True)
class PoolQuestion:
    text: str
    document_id: Optional[str]  # None: serves every document
    chunk_index: Optional[int]  # None: any chunk
    source: str  # FILE:LINE


class QuestionPool:
    """Questions read from ``--questions`` JSONL instead of model-written ones.

    Lines: ``{"question": TEXT}`` (every document) or ``{"document_id": ID, "question": TEXT}``,
    optionally with ``"chunk_index": K`` (only for chunk K of that document, e.g. the chunk that
    holds the fact a templated task asks about). A document's pool is its own lines plus the
    global ones; the draw for a chunk uses the document's seeded RNG.
    """

    def __init__(self, questions: Sequence[PoolQuestion]):
        self.questions = list(questions)
        self._global = [q for q in self.questions if q.document_id is None]
        self._by_doc: dict[str, list[PoolQuestion]] = {}
        for q in self.questions:
            if q.document_id is not None:
                self._by_doc.setdefault(q.document_id, []).append(q)

    @property
    def document_ids(self) -> set[str]:
        return set(self._by_doc)

    def candidates(self, document_id: str, chunk_index: int) -> list[PoolQuestion]:
        pool = self._by_doc.get(document_id, []) + self._global
        return [q for q in pool if q.chunk_index is None or q.chunk_index == chunk_index]

    def chunk_indices(self, document_id: str) -> Optional[set[int]]:
        """Chunks that have a question of their own; None when some question serves any chunk."""
        pool = self._by_doc.get(document_id, []) + self._global
        if any(q.chunk_index is None for q in pool):
            return None
        return {q.chunk_index for q in pool if q.chunk_index is not None}

    def draw(self, document_id: str, chunk_index: int, rng: random.Random, used: set[str]) -> Optional[str]:
        """A question for this chunk, avoiding ones already used in the document when possible."""
        cands = self.candidates(document_id, chunk_index)
        if not cands:
            return None
        fresh = [q for q in cands if q.text not in used]
        return rng.choice(fresh or cands).text


def load_question_pool(path: Union[str, Path]) -> QuestionPool:
    """Read a ``--questions`` JSONL file; any bad line stops with FILE:LINE and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--questions {path}: file does not exist")
    out: list[PoolQuestion] = []
    problems: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: malformed JSON ({e.msg}, column {e.colno})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{where}: expected an object like {{\"question\": TEXT}}")
                continue
            unknown = sorted(set(obj) - {"question", "document_id", "chunk_index"})
            if unknown:
                problems.append(f"{where}: unknown key(s) {unknown}; allowed: question, document_id, chunk_index")
                continue
            q = obj.get("question")
            if not isinstance(q, str) or not q.strip():
                problems.append(f"{where}: field 'question' must be a non-empty string")
                continue
            doc = obj.get("document_id")
            if doc is not None and (isinstance(doc, bool) or not isinstance(doc, (str, int)) or not str(doc).strip()):
                problems.append(f"{where}: field 'document_id' must be a non-empty string or integer")
                continue
            ci = obj.get("chunk_index")
            if ci is not None and (isinstance(ci, bool) or not isinstance(ci, int) or ci < 0):
                problems.append(f"{where}: field 'chunk_index' must be an integer >= 0")
                continue
            if ci is not None and doc is None:
                problems.append(f"{where}: 'chunk_index' needs a 'document_id' (chunks are per document)")
                continue
            out.append(PoolQuestion(q.strip(), None if doc is None else str(doc), ci, where))
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ConfigError(f"--questions {path}: {len(problems)} bad line(s){more}:\n  " + "\n  ".join(problems[:10]))
    if not out:
        raise ConfigError(f"--questions {path}: no questions in the file")
    return QuestionPool(out)
