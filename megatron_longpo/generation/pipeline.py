"""One batch of documents through the stages: chunking -> questions -> answers -> filters -> grouping.

Every random choice of a document comes from an RNG seeded by (seed, document id), and every
request carries a seed derived from (seed, document id, turn, stage), so a document's result does
not depend on the shard, the batch it falls in, or a resume.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from megatron_longpo.config import ConfigError
from megatron_longpo.generation import answers, questions
from megatron_longpo.generation.answers import ANSWER_SAMPLING, QUESTION_SAMPLING
from megatron_longpo.generation.backends import Backend, ChatFormatter, GenRequest
from megatron_longpo.generation.chunking import Chunk, chunk_document
from megatron_longpo.generation.documents import Document
from megatron_longpo.generation.filters import FilterConfig, check_pair
from megatron_longpo.generation.grouping import GeneratedTurn, build_record, select_chunks
from megatron_longpo.generation.prompts import Prompts
from megatron_longpo.generation.questions import QuestionParseError, QuestionPool

# Drop reasons (summary keys). Documents:
DOC_TOO_SHORT = "document_too_short"  # fewer tokens than --chunk-min-tokens / --min-document-tokens
DOC_TOO_LONG = "document_too_long"  # more tokens than --max-document-tokens
DOC_NO_CHUNK = "no_chunk_in_range"  # long enough, but no paragraph run of [min, max] tokens
DOC_NO_POOL_QUESTION = "no_pool_question"  # --questions has nothing for this document
DOC_NO_TURN_LEFT = "all_turns_dropped"
# Turns:
TURN_QUESTION_PROMPT_TOO_LONG = "question_prompt_too_long"
TURN_QUESTION_PARSE = "question_parse_failed"
TURN_PROMPT_TOO_LONG = "answer_prompt_too_long"  # prompt + max_new_tokens over --max-model-len


@dataclass(frozen=True)
class GenerationConfig:
    seed: int = 0
    max_turns: int = 2
    chunk_min_tokens: int = 16384
    chunk_max_tokens: int = 30000
    min_document_tokens: Optional[int] = None  # default: chunk_min_tokens
    max_document_tokens: Optional[int] = None  # default: no limit
    max_question_prompt_tokens: int = 32768
    max_new_tokens: int = 1024
    max_context_tokens: Optional[int] = None  # engine context (vllm --max-model-len): prompt + new tokens
    question_prefix: bool = True
    filters: FilterConfig = field(default_factory=FilterConfig)

    def check(self) -> None:
        if not 0 < self.chunk_min_tokens <= self.chunk_max_tokens:
            raise ConfigError(
                f"--chunk-min-tokens {self.chunk_min_tokens} / --chunk-max-tokens {self.chunk_max_tokens}: "
                "need 0 < min <= max"
            )
        if self.max_turns < 1:
            raise ConfigError(f"--max-turns {self.max_turns}: must be >= 1")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")


def request_seed(seed: int, doc_id: str, turn: int, stage: str) -> int:
    h = hashlib.sha256(f"{seed}\0{doc_id}\0{turn}\0{stage}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


@dataclass
class DocResult:
    """What one document produced: a record or nothing, and every drop counted by reason."""

    doc: Document
    record: Optional[dict[str, Any]] = None
    dropped_document: Optional[str] = None
    dropped_turns: Counter = field(default_factory=Counter)
    stats: Counter = field(default_factory=Counter)  # tokens, turns, truncated answers

    def journal(self) -> dict[str, Any]:
        return {"doc_index": self.doc.index, "doc_id": self.doc.id, "record": self.record,
                "dropped_document": self.dropped_document, "dropped_turns": dict(sorted(self.dropped_turns.items())),
                "stats": dict(sorted(self.stats.items()))}


@dataclass
class _Turn:
    res: DocResult
    rng: random.Random
    chunk: Chunk
    turn: int
    short_context: str
    instruction: Optional[str] = None
    dropped: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None


class Pipeline:
    def __init__(self, cfg: GenerationConfig, prompts: Prompts, formatter: ChatFormatter, backend: Backend,
                 pool: Optional[QuestionPool] = None, meta: Optional[dict[str, Any]] = None):
        cfg.check()
        self.meta = meta if meta is not None else {"chat_template": formatter.describe()}
        self.cfg, self.prompts, self.fmt, self.backend, self.pool = cfg, prompts, formatter, backend, pool
        self.filters = replace(cfg.filters, refusal_phrases=prompts.refusal_phrases)
        self.q_sampling = replace(QUESTION_SAMPLING, max_new_tokens=cfg.max_new_tokens)
        self.a_sampling = replace(ANSWER_SAMPLING, max_new_tokens=cfg.max_new_tokens)

    def _request(self, t: _Turn, stage: str, messages: answers.Messages, sampling, long: bool,
                 count: bool = True) -> GenRequest:
        ids = self.fmt.prompt_ids(messages)
        if count:
            t.res.stats["prompt_tokens"] += len(ids)
        return GenRequest(messages, ids, sampling, request_seed(self.cfg.seed, t.res.doc.id, t.turn, stage), long)

    def _plan(self, doc: Document) -> tuple[DocResult, list[_Turn]]:
        res = DocResult(doc)
        rng = random.Random(f"{self.cfg.seed}\0{doc.id}")
        n_tokens = self.fmt.count_tokens([doc.text])[0]
        res.stats["document_tokens"] = n_tokens
        if n_tokens < (self.cfg.min_document_tokens or self.cfg.chunk_min_tokens):
            res.dropped_document = DOC_TOO_SHORT
            return res, []
        if self.cfg.max_document_tokens is not None and n_tokens > self.cfg.max_document_tokens:
            res.dropped_document = DOC_TOO_LONG
            return res, []
        chunks = chunk_document(doc.text, self.fmt.count_tokens, self.cfg.chunk_min_tokens, self.cfg.chunk_max_tokens)
        if not chunks:
            res.dropped_document = DOC_NO_CHUNK
            return res, []
        allowed = None
        if self.pool is not None:
            allowed = self.pool.chunk_indices(doc.id)
            if not any(self.pool.candidates(doc.id, c.index) for c in chunks):
                res.dropped_document = DOC_NO_POOL_QUESTION
                return res, []
        picked = select_chunks(chunks, self.cfg.max_turns, rng, allowed)
        return res, [_Turn(res, rng, c, k, doc.text[c.start:c.end]) for k, c in enumerate(picked)]

    def _questions(self, turns: list[_Turn]) -> None:
        if self.pool is not None:
            used: dict[str, set[str]] = {}
            for t in turns:
                u = used.setdefault(t.res.doc.id, set())
                q = self.pool.draw(t.res.doc.id, t.chunk.index, t.rng, u)
                assert q is not None  # chunks were selected among those with candidates
                u.add(q)
                t.instruction = self._prefixed(q, t.rng)
            return
        reqs, live = [], []
        for t in turns:
            r = self._request(t, "question", answers.question_messages(self.prompts, t.short_context), self.q_sampling, False)
            if len(r.prompt_ids) > self.cfg.max_question_prompt_tokens or not self._fits(r):
                t.dropped = TURN_QUESTION_PROMPT_TOO_LONG
                continue
            reqs.append(r)
            live.append(t)
        for t, out in zip(live, self.backend.generate(reqs)):
            t.res.stats["generated_tokens"] += out.num_tokens
            try:
                qs = questions.parse_questions(out.text, self.prompts.num_questions)
            except QuestionParseError:
                t.dropped = TURN_QUESTION_PARSE
                continue
            t.instruction = self._prefixed(t.rng.choice(qs), t.rng)

    def _prefixed(self, q: str, rng: random.Random) -> str:
        return questions.with_prefix(q, self.prompts.question_prefixes, rng) if self.cfg.question_prefix else q

    def _fits(self, r: GenRequest) -> bool:
        c = self.cfg.max_context_tokens
        return c is None or len(r.prompt_ids) + r.sampling.max_new_tokens <= c

    def _rejected_request(self, t: _Turn, count: bool) -> GenRequest:
        return self._request(t, "rejected", answers.rejected_messages(self.prompts, t.res.doc.text, t.instruction),
                             self.a_sampling, True, count)

    def _chosen(self, turns: list[_Turn]) -> None:
        """Chosen answers (short context, the model's own RoPE base); a turn whose chosen or rejected
        prompt does not fit the engine is dropped here."""
        live, reqs = [], []
        for t in turns:
            if t.dropped is not None:
                continue
            pair = [self._request(t, "chosen", answers.chosen_messages(self.prompts, t.short_context, t.instruction),
                                  self.a_sampling, False),
                    self._rejected_request(t, count=True)]
            if not all(self._fits(r) for r in pair):
                t.dropped = TURN_PROMPT_TOO_LONG
                continue
            live.append(t)
            reqs.append(pair[0])
        for t, c in zip(live, self.backend.generate(reqs)):
            t.res.stats["generated_tokens"] += c.num_tokens
            t.res.stats["truncated_answers"] += int(not c.finished)
            t.chosen = c.text.strip()

    def _rejected(self, turns: list[_Turn]) -> None:
        """Rejected answers (whole document, --long-rope-theta), then the pair filters."""
        live = [t for t in turns if t.dropped is None]
        outs = self.backend.generate([self._rejected_request(t, count=False) for t in live])
        for t, r in zip(live, outs):
            t.res.stats["generated_tokens"] += r.num_tokens
            t.res.stats["truncated_answers"] += int(not r.finished)
            t.rejected = r.text.strip()
            t.dropped = check_pair(t.chosen, t.rejected, self.filters)

    # -- phases: the short one (questions + chosen answers) and the long one (rejected answers) can
    # run in different processes with different engines; a state is the JSON line between them.

    def short_phase(self, docs: Sequence[Document]) -> list[dict[str, Any]]:
        """Plan, questions and chosen answers of ``docs``: one JSON-able state per document."""
        results, turns = [], []
        for d in docs:
            res, ts = self._plan(d)
            results.append(res)
            turns.extend(ts)
        self._questions(turns)
        self._chosen(turns)
        by_doc: dict[int, list[_Turn]] = {}
        for t in turns:
            by_doc.setdefault(t.res.doc.index, []).append(t)
        return [{**res.journal(), "turns": [
            {"chunk_index": t.chunk.index, "turn": t.turn, "short_context": t.short_context,
             "instruction": t.instruction, "chosen": t.chosen, "dropped": t.dropped}
            for t in by_doc.get(res.doc.index, [])]} for res in results]

    def long_phase(self, docs: Sequence[Document], states: Sequence[dict[str, Any]]) -> list[DocResult]:
        """Rejected answers, filters and records of ``docs`` from their short-phase ``states``."""
        results, turns = [], []
        for d, st in zip(docs, states):
            if st["doc_index"] != d.index or st["doc_id"] != d.id:
                raise ConfigError(f"short-phase state of document #{st['doc_index']} ({st['doc_id']!r}) does not "
                                  f"belong to document #{d.index} ({d.id!r}); the inputs changed since the run started")
            res = DocResult(d, dropped_document=st["dropped_document"], dropped_turns=Counter(st["dropped_turns"]),
                            stats=Counter(st["stats"]))
            results.append(res)
            for x in st["turns"]:
                turns.append(_Turn(res, random.Random(0), Chunk(x["chunk_index"], 0, 0, 0), x["turn"], x["short_context"],
                                   x["instruction"], x["dropped"], x["chosen"]))
        self._rejected(turns)
        return self._finish(results, turns)

    def run(self, docs: Sequence[Document]) -> list[DocResult]:
        """Results of ``docs`` in the given order (both phases on this backend)."""
        return self.long_phase(docs, self.short_phase(docs))

    def _finish(self, results: list[DocResult], turns: list[_Turn]) -> list[DocResult]:
        by_doc: dict[int, list[_Turn]] = {}
        for t in turns:
            by_doc.setdefault(t.res.doc.index, []).append(t)
        for res in results:
            ts = by_doc.get(res.doc.index, [])
            res.stats["turns_attempted"] += len(ts)
            kept = []
            for t in ts:
                if t.dropped is not None:
                    res.dropped_turns[t.dropped] += 1
                else:
                    kept.append(GeneratedTurn(t.chunk.index, t.short_context, t.instruction, t.chosen, t.rejected))
            if res.dropped_document is None and not kept:
                res.dropped_document = DOC_NO_TURN_LEFT
            if kept:
                res.record = build_record(res.doc.id, res.doc.text, kept, self.prompts.system, self.meta)
                res.stats["turns_written"] += len(kept)
        return results
