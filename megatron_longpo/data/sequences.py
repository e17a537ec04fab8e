"""Records -> conversations -> token sequences with exact response masks.

LongPO record (turns i = 1..n, optional system):
  S_w = render([system], user(document + SEP + I_1), asst(y_w,1), user(I_2), asst(y_w,2), ...)
  S_l = the same with y_l,i
  reference turn i (no history): render([system], user(short_context_i + SEP + I_i), asst(y_i))
Plain pair record: S = render(prompt messages, asst(chosen | rejected)); with ``short_prompt`` one
reference turn render(short_prompt, asst(...)); without it no reference (loss.mode=dpo or sft only).

Each sequence is the whole rendered conversation tokenized once, so its ids equal the
tokenizer's ``apply_chat_template(messages, tokenize=True)``; masks come from character spans.
The document is the only thing ``--overlong truncate_document`` may shorten, and only outside the
short contexts C_S of the record's turns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_longpo.data.pair_layout import row_length
from megatron_longpo.data.sample import PreferenceSample, ReferenceTurn
from megatron_longpo.data.schema import DataError, LongPORecord, PairRecord, Record
from megatron_longpo.data.templates import ChatMessage, ChatTemplate, Piece, generation_prompt
from megatron_longpo.data.tokenizer import Tokenizer

DEFAULT_SEPARATOR = "\n\n"  # between the document (or short context) and the first instruction
OVERLONG_CHOICES = ("error", "drop", "truncate_document")

# Drop reasons produced while building (schema reasons are in schema.py).
OVERLONG = "overlong"
OVERLONG_UNTRUNCATABLE = "overlong_untruncatable"
OVERLONG_UNGROUNDED = "overlong_short_context"  # truncation cannot keep every turn's short context
IDENTICAL = "chosen_equals_rejected"
TEMPLATE_ERROR = "template_error"


def pair_row_length(layout: str, len_w: int, len_l: int, mask_w: np.ndarray) -> int:
    """Row length of the pair in ``layout`` (:func:`megatron_longpo.data.pair_layout.row_length`),
    the shared prefix P cut where :func:`split_shared_prefix` cuts it (first response token - 1)."""
    p = max(int(np.argmax(mask_w)) - 1 if mask_w.any() else 0, 0)
    return row_length(layout, p, len_w - p, len_l - p)


class OverlongError(DataError):
    """A record is longer than --max-seq-length and --overlong is error."""

    def __init__(self, message: str, length: int = 0) -> None:
        super().__init__(message)
        self.length = length  # tokens of the longer policy sequence


OVERLONG_ERROR = "overlong_error"  # reason of a record over the bound under --overlong error (never written)


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


@dataclass
class Encoded:
    """One rendered conversation tokenized as a whole string."""

    ids: np.ndarray  # [L] int64
    response: np.ndarray  # [L] uint8, 1 on response tokens
    starts: np.ndarray  # [L] character span of every token in the rendered text
    ends: np.ndarray
    document: Optional[tuple[int, int]]  # character span of the truncatable document piece
    document_text: str = ""


def _overlaps(starts: np.ndarray, ends: np.ndarray, a: int, b: int) -> np.ndarray:
    """Tokens holding at least one character of [a, b) (an empty-span token counts at its start)."""
    return np.where(starts == ends, (starts >= a) & (starts < b), (starts < b) & (ends > a))


def encode_pieces(pieces: Sequence[Piece], tok: Tokenizer) -> Encoded:
    """Tokenize the rendered text of ``pieces`` once and mark response tokens by character span.

    HF tokenizers get the whole string (special-token strings are parsed, as in
    ``apply_chat_template(..., tokenize=True)``). Sentencepiece models do not parse control tokens
    (<s>, </s>) in text, so the text between them is tokenized as one string each (the behaviour of
    HF's LlamaTokenizer over the same model); user-defined symbols ([INST], <|im_end|>) stay in the
    text, which sentencepiece matches itself. A token is a response token when it holds a character
    of a response piece (assistant content or the end-of-turn token closing it).
    """
    spans, pos = [], 0
    for p in pieces:
        spans.append((pos, pos + len(p.text)))
        pos += len(p.text)
    text = "".join(p.text for p in pieces)
    if tok.kind == "sentencepiece":
        ids_l, st_l, en_l, seg_start = [], [], [], 0
        for p, (a, b) in list(zip(pieces, spans)) + [(None, (len(text), len(text)))]:
            if p is not None and (p.token_id < 0 or not tok.is_special(p.token_id)):
                continue
            ids, st, en = tok.encode_with_offsets(text[seg_start:a])
            ids_l += [ids, np.array([p.token_id] if p is not None else [], dtype=np.int64)]
            st_l += [st + seg_start, np.array([a] if p is not None else [], dtype=np.int64)]
            en_l += [en + seg_start, np.array([b] if p is not None else [], dtype=np.int64)]
            seg_start = b
        ids, starts, ends = np.concatenate(ids_l), np.concatenate(st_l), np.concatenate(en_l)
    else:
        ids, starts, ends = tok.encode_with_offsets(text)
    for p, (a, b) in zip(pieces, spans):
        if p.token_id >= 0:
            hit = np.nonzero((starts == a) & (ends == b))[0]
            if len(hit) != 1 or ids[hit[0]] != p.token_id:
                raise DataError(
                    f"tokenizer {tok.path} does not read {p.text!r} in the rendered conversation as the single "
                    f"token {p.token_id}; use the tokenizer's own template (--chat-template tokenizer)"
                )
    response = np.zeros(len(ids), dtype=bool)
    for p, (a, b) in zip(pieces, spans):
        if p.response and b > a:
            response |= _overlaps(starts, ends, a, b)
    doc = [(sp, p.text) for p, sp in zip(pieces, spans) if p.document]
    return Encoded(ids, response.astype(np.uint8), starts, ends, doc[0][0] if doc else None, doc[0][1] if doc else "")


def generation_prompt_ids(template: ChatTemplate, tok: Tokenizer, messages: Sequence[ChatMessage]) -> np.ndarray:
    """Token ids of the prompt before the next assistant message (:func:`templates.generation_prompt`),
    tokenized as a whole like every training sequence: the ids a training sequence has before its
    response tokens."""
    return encode_pieces(generation_prompt(template, messages), tok).ids


def _find_normalized(haystack: str, needle: str) -> Optional[tuple[int, int]]:
    """Character span of ``needle`` in ``haystack``, exactly or up to whitespace (runs of
    whitespace match any run, e.g. paragraphs re-joined with a space), or None."""
    at = haystack.find(needle)
    if at >= 0:
        return at, at + len(needle)
    words = needle.split()
    if not words:
        return None
    pattern = r"\s+".join(re.escape(w) for w in words)
    m = re.search(pattern, haystack)
    return (m.start(), m.end()) if m else None


def _cut_plan(gaps: list[tuple[int, int]], excess: int) -> list[tuple[int, int]]:
    """Token ranges to remove: ``excess`` tokens taken from the gaps in proportion to their size,
    each from the middle of its gap (keeping its first ceil(k/2) and last floor(k/2) tokens)."""
    sizes = np.array([b - a for a, b in gaps], dtype=np.int64)
    total = int(sizes.sum())
    take = (sizes * excess) // total
    rest = excess - int(take.sum())
    for i in np.argsort(-(sizes * excess - take * total), kind="stable")[:rest]:
        take[i] += 1
    cuts = []
    for (a, b), r in zip(gaps, take):
        if r:
            keep = (b - a) - int(r)
            head = keep - keep // 2
            cuts.append((a + head, a + head + int(r)))
    return cuts


def _remove(enc: Encoded, cuts: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    keep = np.ones(len(enc.ids), dtype=bool)
    for a, b in cuts:
        keep[a:b] = False
    return enc.ids[keep], enc.response[keep]


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


def _grounding(record: Record) -> list[str]:
    """Texts a truncated document must keep: each turn's short context C_S (the chosen answers were
    written from it). For a pair record, the short prompt's context: its longest user message
    without the ending it shares with the long prompt (the question)."""
    if isinstance(record, LongPORecord):
        return [t.short_context for t in record.turns]
    if record.short_prompt is None:
        return []
    short = max((m.content for m in record.short_prompt if m.role == "user"), key=len)
    long = max((m.content for m in record.prompt if m.role == "user"), key=len)
    n = 0
    while n < min(len(short), len(long)) and short[-1 - n] == long[-1 - n]:
        n += 1
    core = short[: len(short) - n].strip()
    return [core or short]


def split_shared_prefix(sample_id: str, ids_w: np.ndarray, mask_w: np.ndarray, ids_l: np.ndarray,
                        mask_l: np.ndarray, where: str) -> PreferenceSample:
    """Shared-prefix form of (S_w, S_l): P = first response token - 1, which must be the same in both
    and preceded by identical ids (the prompt)."""
    if not mask_w.any() or not mask_l.any():
        raise DataError(f"{where}: no response tokens in the {'chosen' if not mask_w.any() else 'rejected'} sequence")
    first_w, first_l = int(np.argmax(mask_w)), int(np.argmax(mask_l))
    if first_w != first_l or first_w < 1:
        raise DataError(f"{where}: the first response token is at position {first_w} in the chosen sequence and "
                        f"{first_l} in the rejected one; both must follow the same non-empty prompt")
    p = first_w - 1
    if not np.array_equal(ids_w[: p + 1], ids_l[: p + 1]):
        at = int(np.argmax(ids_w[: p + 1] != ids_l[: p + 1]))
        raise DataError(f"{where}: chosen and rejected prompts differ at token {at} (of {p + 1}); a pair must share "
                        "its prompt")
    sample = PreferenceSample(
        id=sample_id, prefix=ids_w[:p], chosen_branch=ids_w[p:], rejected_branch=ids_l[p:],
        chosen_branch_mask=mask_w[p:], rejected_branch_mask=mask_l[p:],
    )
    return sample


def build_sample(
    record: Record,
    tok: Tokenizer,
    template: ChatTemplate,
    *,
    max_seq_length: Optional[int] = None,
    overlong: str = "error",
    separator: str = DEFAULT_SEPARATOR,
    drop_identical: bool = False,
    pair_layout: str = "two_sequences",
) -> BuildResult:
    """Tokenize one record into a PreferenceSample (or a drop decision).

    Every sequence is the tokenizer's own tokenization of the whole rendered conversation.
    ``max_seq_length`` bounds the row of ``pair_layout``: max(len S_w, len S_l) for two_sequences,
    len S_w + len S_l - shared prefix for shared_prefix (always the longer); over it ``overlong``
    decides: ``error`` raises DataError, ``drop`` drops, ``truncate_document`` removes document
    tokens outside every turn's short context (token-exact, never a response or template token)
    or drops the record when that cannot fit or a short context cannot be located.
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
    try:
        enc_w = encode_pieces(rendered.chosen, tok)
        enc_l = encode_pieces(rendered.rejected, tok)
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    full_len = row_length("two_sequences", 0, len(enc_w.ids), len(enc_l.ids))
    ids_w, mask_w, ids_l, mask_l = enc_w.ids, enc_w.response, enc_l.ids, enc_l.response
    truncated = 0
    kw = dict(identical=identical, identical_turns=n_same, two_sequences_length=full_len)
    # Removing k document tokens (inside the shared prefix) shortens either layout's row by k.
    row_len = pair_row_length(pair_layout, len(ids_w), len(ids_l), mask_w)
    if max_seq_length is not None and row_len > max_seq_length:
        what = "longest of chosen/rejected sequence" if pair_layout == "two_sequences" else "shared_prefix row"
        msg = f"{where} needs {row_len} tokens ({what}), more than --max-seq-length {max_seq_length}"
        if overlong == "error":
            raise OverlongError(
                f"{msg}; pass --overlong drop or --overlong truncate_document, or raise --max-seq-length",
                length=row_len,
            )
        if overlong == "drop":
            return BuildResult(None, OVERLONG, msg, **kw)
        excess = row_len - max_seq_length
        if enc_w.document is None:
            return BuildResult(None, OVERLONG_UNTRUNCATABLE, f"{msg}, and it has no document to truncate", **kw)
        a, b = enc_w.document
        inside = np.nonzero((enc_w.starts >= a) & (enc_w.ends <= b) & (enc_w.ends > enc_w.starts))[0]
        d0, d1 = (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)
        n_doc = d1 - d0
        if excess > n_doc:
            return BuildResult(None, OVERLONG_UNTRUNCATABLE,
                               f"{msg}, and removing the whole document ({n_doc} tokens) is not enough", **kw)
        # Keep every token of each short context C_S; cut only between them.
        keep = np.zeros(len(ids_w), dtype=bool)
        for i, text in enumerate(_grounding(record)):
            span = _find_normalized(enc_w.document_text, text)
            if span is None:
                return BuildResult(None, OVERLONG_UNGROUNDED,
                                   f"{msg}, and the short context of turn {i + 1} does not occur in the document, "
                                   "so truncation cannot keep it", **kw)
            keep |= _overlaps(enc_w.starts, enc_w.ends, a + span[0], a + span[1])
        free = ~keep[d0:d1]
        if excess > int(free.sum()):
            return BuildResult(None, OVERLONG_UNGROUNDED,
                               f"{msg}, and the document has only {int(free.sum())} tokens outside the short "
                               "contexts of its turns", **kw)
        gaps, i = [], 0
        while i < n_doc:
            if free[i]:
                j = i
                while j < n_doc and free[j]:
                    j += 1
                gaps.append((d0 + i, d0 + j))
                i = j
            else:
                i += 1
        cuts = _cut_plan(gaps, excess)
        # the prompt (document included) is token-identical in S_w and S_l up to the first response
        if cuts and (cuts[-1][1] > int(np.argmax(mask_l)) or not np.array_equal(ids_w[:d1], ids_l[:d1])):
            raise DataError(f"{where}: chosen and rejected sequences tokenize the document differently")
        ids_w, mask_w = _remove(enc_w, cuts)
        ids_l, mask_l = _remove(enc_l, cuts)
        truncated = excess
    sample = split_shared_prefix(record.id, ids_w, mask_w, ids_l, mask_l, where)
    for pc, pr in rendered.references:
        try:
            rc, rr = encode_pieces(pc, tok), encode_pieces(pr, tok)
        except DataError as e:
            raise DataError(f"{where}: {e}") from e
        sample.references.append(ReferenceTurn(rc.ids, rc.response, rr.ids, rr.response))
    sample.check()
    return BuildResult(sample, truncated_tokens=truncated, **kw)
