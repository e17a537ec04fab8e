"""Split a long document into chunks of [min, max] tokens at paragraph (or LaTeX section) boundaries.

Every chunk is a contiguous span of the document text (``document[start:end]``), so the
short context of a record is always a substring of its document. A paragraph longer than the
maximum, and runs of paragraphs that end below the minimum, produce no chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

_BLANK_LINES = re.compile(r"\n\s*\n")
_SECTION = re.compile(r"\\section\*?\{")


@dataclass(frozen=True)
class Chunk:
    index: int  # position among the document's chunks
    start: int  # character span in the document
    end: int
    num_tokens: int


def is_latex(text: str) -> bool:
    return len(_SECTION.findall(text)) >= 2


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of paragraphs: split at blank lines, or before ``\\section`` in LaTeX sources."""
    if is_latex(text):
        cuts = [m.start() for m in _SECTION.finditer(text)]
        bounds = ([0] if cuts[0] > 0 else []) + cuts + [len(text)]
        spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        spans, pos = [], 0
        for m in _BLANK_LINES.finditer(text):
            spans.append((pos, m.start()))
            pos = m.end()
        spans.append((pos, len(text)))
    out = []
    for a, b in spans:  # trim whitespace so spans start and end on text
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


def chunk_document(
    text: str, count_tokens: Callable[[Sequence[str]], list[int]], min_tokens: int, max_tokens: int
) -> list[Chunk]:
    """Greedy packing of consecutive paragraphs into chunks of at most ``max_tokens`` tokens.

    ``count_tokens`` maps a list of strings to their token counts (one batched tokenizer call).
    A chunk's size is the sum of its paragraphs' counts plus one token per paragraph break, an
    upper-bound-ish estimate that avoids re-tokenizing every candidate span.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < chunk min ({min_tokens}) <= chunk max ({max_tokens})")
    spans = paragraph_spans(text)
    counts = count_tokens([text[a:b] for a, b in spans]) if spans else []
    chunks: list[Chunk] = []
    cur: list[int] = []  # paragraph indices of the open chunk
    cur_tokens = 0

    def close() -> None:
        if cur and cur_tokens >= min_tokens:
            chunks.append(Chunk(len(chunks), spans[cur[0]][0], spans[cur[-1]][1], cur_tokens))

    for i, n in enumerate(counts):
        add = n + (1 if cur else 0)
        if cur and cur_tokens + add > max_tokens:
            close()
            cur, cur_tokens = [], 0
            add = n
        if n > max_tokens:  # a paragraph alone is too big: it breaks the run
            continue
        cur.append(i)
        cur_tokens += add
    close()
    return chunks
