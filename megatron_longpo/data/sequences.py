"""Records -> conversations -> token sequences with exact response masks.

LongPO record (turns i = 1..n, optional system):
  S_w = render([system], user(document + SEP + I_1), asst(y_w,1), user(I_2), asst(y_w,2), ...)
  S_l = the same with y_l,i
  reference turn i (no history): render([system], user(short_context_i + SEP + I_i), asst(y_i))
Plain pair record: S = render(prompt messages, asst(chosen | rejected)); with ``short_prompt`` one
reference turn render(short_prompt, asst(...)); without it no reference (loss.mode=dpo or sft only).

The document is a separate piece, tokenized once per record and shared by S_w and S_l; it is also
the only thing ``--overlong truncate_document`` may shorten (keeping its first and last tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_longpo.data.sample import PreferenceSample, ReferenceTurn
from megatron_longpo.data.schema import DataError, LongPORecord, PairRecord, Record
from megatron_longpo.data.templates import ChatMessage, ChatTemplate, Piece
from megatron_longpo.data.tokenizer import Tokenizer

DEFAULT_SEPARATOR = "\n\n"  # between the document (or short context) and the first instruction
OVERLONG_CHOICES = ("error", "drop", "truncate_document")

# Drop reasons produced while building (schema reasons are in schema.py).
OVERLONG = "overlong"
OVERLONG_UNTRUNCATABLE = "overlong_untruncatable"
IDENTICAL = "chosen_equals_rejected"
TEMPLATE_ERROR = "template_error"


class OverlongError(DataError):
    """A record is longer than --max-seq-length and --overlong is error."""


@dataclass(frozen=True)
class Conversations:
    chosen: list[ChatMessage]
    rejected: list[ChatMessage]
    references: list[tuple[list[ChatMessage], list[ChatMessage]]]  # per turn (chosen, rejected)


def _answer(text: str) -> ChatMessage:
    return ChatMessage("assistant", (text,), response=True)


def record_conversations(record: Record, separator: str = DEFAULT_SEPARATOR) -> Conversations:
    if isinstance(record, LongPORecord):
        system = [ChatMessage("system", (record.system,))] if record.system else []
        t0 = record.turns[0]
        first = ChatMessage("user", (record.document, separator + t0.instruction), document_part=0)
        chosen, rejected = system + [first], system + [first]
        for i, t in enumerate(record.turns):
            if i > 0:
                chosen.append(ChatMessage("user", (t.instruction,)))
                rejected.append(ChatMessage("user", (t.instruction,)))
            chosen.append(_answer(t.chosen))
            rejected.append(_answer(t.rejected))
        refs = []
        for t in record.turns:
            user = ChatMessage("user", (t.short_context, separator + t.instruction))
            refs.append((system + [user, _answer(t.chosen)], system + [user, _answer(t.rejected)]))
        return Conversations(chosen, rejected, refs)
    assert isinstance(record, PairRecord)
    # The longest user message of the prompt plays the document (truncatable) role.
    user_lens = [len(m.content) if m.role == "user" else -1 for m in record.prompt]
    doc = int(np.argmax(user_lens))
    prompt = [
        ChatMessage(m.role, (m.content,), document_part=0 if i == doc else -1) for i, m in enumerate(record.prompt)
    ]
    refs = []
    if record.short_prompt is not None:
        short = [ChatMessage(m.role, (m.content,)) for m in record.short_prompt]
        refs.append((short + [_answer(record.chosen)], short + [_answer(record.rejected)]))
    return Conversations(prompt + [_answer(record.chosen)], prompt + [_answer(record.rejected)], refs)


@dataclass
class RenderedRecord:
    chosen: list[Piece]
    rejected: list[Piece]
    references: list[tuple[list[Piece], list[Piece]]]


def render_record(record: Record, template: ChatTemplate, separator: str = DEFAULT_SEPARATOR) -> RenderedRecord:
    conv = record_conversations(record, separator)
    try:
        return RenderedRecord(
            template.render(conv.chosen),
            template.render(conv.rejected),
            [(template.render(c), template.render(r)) for c, r in conv.references],
        )
    except DataError as e:
        raise DataError(f"{record.source}: record {record.id!r}: {e}") from e


def _encode(pieces: Sequence[Piece], tok: Tokenizer, cache: dict) -> list[np.ndarray]:
    out = []
    for p in pieces:
        if p.token_id >= 0:
            out.append(np.array([p.token_id], dtype=np.int64))
            continue
        ids = cache.get(p.text)
        if ids is None:
            ids = tok.encode(p.text)
            cache[p.text] = ids
        out.append(ids)
    return out


def _assemble(pieces: Sequence[Piece], arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    mask = np.concatenate([np.full(len(a), p.response, dtype=np.uint8) for p, a in zip(pieces, arrays)])
    return ids, mask


def _truncate_middle(ids: np.ndarray, keep: int) -> np.ndarray:
    """Keep the first ceil(keep/2) and the last floor(keep/2) tokens."""
    tail = keep // 2
    head = keep - tail
    return np.concatenate([ids[:head], ids[len(ids) - tail:]])


@dataclass
class BuildResult:
    sample: Optional[PreferenceSample]  # None when dropped
    drop_reason: Optional[str] = None
    message: str = ""
    truncated_tokens: int = 0  # document tokens removed by truncate_document
    identical: bool = False  # S_w == S_l (every turn has chosen == rejected)
    identical_turns: int = 0
    two_sequences_length: int = 0  # before any truncation


def _identical_turns(record: Record) -> tuple[int, int]:
    if isinstance(record, LongPORecord):
        return sum(t.chosen == t.rejected for t in record.turns), len(record.turns)
    return int(record.chosen == record.rejected), 1


def build_sample(
    record: Record,
    tok: Tokenizer,
    template: ChatTemplate,
    *,
    max_seq_length: Optional[int] = None,
    overlong: str = "error",
    separator: str = DEFAULT_SEPARATOR,
    drop_identical: bool = False,
) -> BuildResult:
    """Tokenize one record into a PreferenceSample (or a drop decision).

    ``max_seq_length`` bounds max(len S_w, len S_l), the two_sequences row; over it ``overlong``
    decides: ``error`` raises DataError, ``drop`` drops, ``truncate_document`` removes the middle of
    the document (token-exact, never a response) or drops when even that cannot fit.
    """
    if overlong not in OVERLONG_CHOICES:
        raise DataError(f"--overlong {overlong!r} is not one of {list(OVERLONG_CHOICES)}")
    where = f"{record.source}: record {record.id!r}"
    n_same, n_turns = _identical_turns(record)
    identical = n_same == n_turns
    if identical and drop_identical:
        return BuildResult(None, IDENTICAL, f"{where}: chosen == rejected in every turn (--drop-identical)",
                           identical=True, identical_turns=n_same)
    rendered = render_record(record, template, separator)
    cache: dict = {}
    arr_w = _encode(rendered.chosen, tok, cache)
    arr_l = _encode(rendered.rejected, tok, cache)
    len_w, len_l = sum(map(len, arr_w)), sum(map(len, arr_l))
    full_len = max(len_w, len_l)
    truncated = 0
    if max_seq_length is not None and full_len > max_seq_length:
        msg = (f"{where} needs {full_len} tokens (longest of chosen/rejected sequence), more than "
               f"--max-seq-length {max_seq_length}")
        if overlong == "error":
            raise OverlongError(
                f"{msg}; pass --overlong drop or --overlong truncate_document, or raise --max-seq-length"
            )
        if overlong == "drop":
            return BuildResult(None, OVERLONG, msg, identical=identical, identical_turns=n_same,
                               two_sequences_length=full_len)
        docs = [i for i, p in enumerate(rendered.chosen) if p.document]
        excess = full_len - max_seq_length
        n_doc = len(arr_w[docs[0]]) if docs else 0
        if not docs or excess > n_doc:
            return BuildResult(None, OVERLONG_UNTRUNCATABLE,
                               f"{msg}, and removing the whole document ({n_doc} tokens) is not enough",
                               identical=identical, identical_turns=n_same, two_sequences_length=full_len)
        d = docs[0]
        assert rendered.rejected[d].document and arr_l[d] is arr_w[d]  # the prompt is shared
        short = _truncate_middle(arr_w[d], n_doc - excess)
        arr_w[d] = arr_l[d] = short
        truncated = excess
    ids_w, mask_w = _assemble(rendered.chosen, arr_w)
    ids_l, mask_l = _assemble(rendered.rejected, arr_l)
    first_w, first_l = int(np.argmax(mask_w)), int(np.argmax(mask_l))
    if not mask_w.any() or not mask_l.any() or first_w != first_l or first_w < 1:
        raise DataError(f"{where}: the chat template produced no response tokens after a prompt")
    p = first_w - 1
    if not np.array_equal(ids_w[: p + 1], ids_l[: p + 1]):
        raise DataError(f"{where}: the chat template renders the prompt differently for chosen and rejected")
    refs = []
    for pc, pr in rendered.references:
        rc, mc = _assemble(pc, _encode(pc, tok, cache))
        rr, mr = _assemble(pr, _encode(pr, tok, cache))
        refs.append(ReferenceTurn(rc, mc, rr, mr))
    sample = PreferenceSample(
        id=record.id,
        prefix=ids_w[:p],
        chosen_branch=ids_w[p:],
        rejected_branch=ids_l[p:],
        chosen_branch_mask=mask_w[p:],
        rejected_branch_mask=mask_l[p:],
        references=refs,
    )
    sample.check()
    return BuildResult(sample, truncated_tokens=truncated, identical=identical, identical_turns=n_same,
                       two_sequences_length=full_len)
