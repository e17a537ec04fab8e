"""Turns of one document -> one LongPO multi-turn record (the format tools/preprocess_data.py reads)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_longpo.generation.chunking import Chunk


@dataclass(frozen=True)
class GeneratedTurn:
    chunk_index: int
    short_context: str
    instruction: str
    chosen: str
    rejected: str


def select_chunks(chunks: Sequence[Chunk], max_turns: int, rng: random.Random,
                  allowed: Optional[set[int]] = None) -> list[Chunk]:
    """Up to ``max_turns`` distinct chunks drawn by ``rng``, returned in document order."""
    pool = [c for c in chunks if allowed is None or c.index in allowed]
    picked = rng.sample(pool, min(max_turns, len(pool)))
    return sorted(picked, key=lambda c: c.index)


def build_record(doc_id: str, document: str, turns: Sequence[GeneratedTurn], system: Optional[str],
                 meta: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The record; turns keep document order (turn i's chunk precedes turn i+1's). ``meta``
    (e.g. the chat template the prompts were rendered with) goes under the key ``meta``."""
    rec: dict[str, Any] = {"id": doc_id}
    if system:
        rec["system"] = system
    rec["document"] = document
    rec["turns"] = [
        {"short_context": t.short_context, "instruction": t.instruction, "chosen": t.chosen, "rejected": t.rejected}
        for t in turns
    ]
    if meta:
        rec["meta"] = meta
    return rec
