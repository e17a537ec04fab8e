"""Input records: reading JSONL / JSON-array files and validating the two record schemas.

LongPO multi-turn record::

    {"id": "doc-17", "system": "optional", "document": "<long text>",
     "turns": [{"short_context": "<chunk C_S>", "instruction": "<question>",
                "chosen": "<answer given C_S>", "rejected": "<answer given the document>"}, ...],
     "meta": {"chat_template": {"name": "chatml", "fingerprint": "..."}}}   (optional; written by
                                    tools/generate_longpo_data.py; preprocessing refuses another template)

Plain (TRL-like) pair record::

    {"id": "p-3", "prompt": "<text>" | [{"role": ..., "content": ...}, ...],
     "chosen": "<text>" | [{"role": "assistant", "content": ...}], "rejected": ...,
     "short_prompt": optional, same form as prompt}

The authors' intermediate JSON (one turn per record; user message = prompt + SEP + question)::

    {"prompt_id": "...", "prompt": "<long document>", "short_prompt": "<chunk C_S>",
     "question": "<instruction>", "chosen": "<text>", "rejected": "<text>"}

is read as the equivalent one-turn LongPO record (document = prompt, short_context = short_prompt,
instruction = question; ``id`` falls back to ``prompt_id``). A key that would change the
conversation but is not used by the record's form (e.g. ``system`` in a pair record) is refused;
other unknown keys are ignored and counted (``Record.ignored_keys``).

Every problem is reported as ``FILE:LINE: field 'PATH': problem`` with a machine-readable reason
(used for the counts and the ``NAME.rejected.jsonl`` file of ``--skip-invalid``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from megatron_longpo.data.errors import DataError
from megatron_longpo.data.tables import find_tables, is_table_input, iter_table_rows


# Reasons a record is rejected (keys of the summary counts and of NAME.rejected.jsonl).
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
UNKNOWN_FORMAT = "unknown_format"
MISSING_FIELD = "missing_field"
EMPTY_FIELD = "empty_field"
WRONG_TYPE = "wrong_type"
EMPTY_TURNS = "empty_turns"
BAD_MESSAGES = "bad_messages"
DUPLICATE_ID = "duplicate_id"
UNUSED_KEY = "unused_conversation_key"

# Keys each record form reads, and keys that change a conversation wherever they appear: one of
# these that the form does not read is refused rather than silently dropped.
LONGPO_KEYS = frozenset({"id", "system", "document", "turns", "meta"})
TURN_KEYS = frozenset({"short_context", "instruction", "chosen", "rejected"})
PAIR_KEYS = frozenset({"id", "prompt", "chosen", "rejected", "short_prompt"})
OFFICIAL_KEYS = frozenset({"id", "prompt_id", "prompt", "short_prompt", "question", "chosen", "rejected"})
CONVERSATION_KEYS = frozenset({
    "system", "system_prompt", "document", "turns", "prompt", "short_prompt", "question", "instruction",
    "short_context", "context", "input", "query", "messages", "conversations", "history", "chosen", "rejected",
    "response", "answer", "output", "chat_template", "tools",
})


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Turn:
    short_context: str
    instruction: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class LongPORecord:
    id: str
    document: str
    turns: tuple[Turn, ...]
    system: Optional[str] = None
    source: str = ""  # "FILE:LINE", for messages
    ignored_keys: tuple[str, ...] = ()  # unknown keys that do not change the conversation
    chat_template: Optional[dict] = None  # meta.chat_template: {"name", "fingerprint"} the answers were generated with


@dataclass(frozen=True)
class PairRecord:
    id: str
    prompt: tuple[Message, ...]  # ends with a user message
    chosen: str
    rejected: str
    short_prompt: Optional[tuple[Message, ...]] = None
    source: str = ""
    ignored_keys: tuple[str, ...] = ()


Record = Union[LongPORecord, PairRecord]


@dataclass(frozen=True)
class InvalidRecord:
    source: str
    reason: str
    message: str  # full text, starts with source
    raw: Any  # the parsed object, or the raw line when it is not JSON


class _Invalid(Exception):
    def __init__(self, reason: str, field: Optional[str], problem: str):
        super().__init__(problem)
        self.reason, self.field, self.problem = reason, field, problem


# ----------------------------------------------------------------------------------------------
# Field validation
# ----------------------------------------------------------------------------------------------


def _type_name(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(v), type(v).__name__
    )


def _text(obj: dict, key: str, path: str) -> str:
    if key not in obj:
        raise _Invalid(MISSING_FIELD, path, "is missing")
    v = obj[key]
    if not isinstance(v, str):
        raise _Invalid(WRONG_TYPE, path, f"must be a string, got {_type_name(v)}")
    if not v.strip():
        raise _Invalid(EMPTY_FIELD, path, "is empty")
    return v


def _record_id(obj: dict) -> str:
    if "id" not in obj:
        raise _Invalid(MISSING_FIELD, "id", "is missing (every record needs a unique id)")
    v = obj["id"]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise _Invalid(WRONG_TYPE, "id", f"must be a string or an integer, got {_type_name(v)}")
    s = str(v)
    if not s.strip():
        raise _Invalid(EMPTY_FIELD, "id", "is empty")
    return s


def _messages(v: Any, path: str) -> tuple[Message, ...]:
    """A prompt: a string (one user message) or chat messages ending with a user message."""
    if isinstance(v, str):
        if not v.strip():
            raise _Invalid(EMPTY_FIELD, path, "is empty")
        return (Message("user", v),)
    if not isinstance(v, list):
        raise _Invalid(WRONG_TYPE, path, f"must be a string or a list of chat messages, got {_type_name(v)}")
    if not v:
        raise _Invalid(EMPTY_FIELD, path, "is an empty message list")
    out = []
    for i, m in enumerate(v):
        p = f"{path}[{i}]"
        if not isinstance(m, dict):
            raise _Invalid(WRONG_TYPE, p, f"must be an object with 'role' and 'content', got {_type_name(m)}")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise _Invalid(BAD_MESSAGES, f"{p}.role", f"must be 'system', 'user' or 'assistant', got {role!r}")
        out.append(Message(role, _text(m, "content", f"{p}.content")))
    roles = [m.role for m in out]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise _Invalid(BAD_MESSAGES, path, "a 'system' message may only come first")
    if not body:
        raise _Invalid(BAD_MESSAGES, path, "has no user message")
    for i, r in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if r != want:
            raise _Invalid(
                BAD_MESSAGES, path, f"roles must alternate user/assistant starting with user, got {roles}"
            )
    if body[-1] != "user":
        raise _Invalid(BAD_MESSAGES, path, f"must end with a user message (the response follows it), got {roles}")
    return tuple(out)


def _response(obj: dict, key: str) -> str:
    """chosen / rejected of a pair record: a string or [{"role": "assistant", "content": ...}]."""
    if key not in obj:
        raise _Invalid(MISSING_FIELD, key, "is missing")
    v = obj[key]
    if isinstance(v, list):
        if len(v) != 1 or not isinstance(v[0], dict) or v[0].get("role") != "assistant":
            raise _Invalid(BAD_MESSAGES, key, "as a message list must hold exactly one assistant message")
        return _text(v[0], "content", f"{key}[0].content")
    return _text(obj, key, key)


def _check_keys(obj: dict, used: frozenset, form: str, path: str = "") -> tuple[str, ...]:
    """Unknown keys of ``obj``: refuse one that changes conversations, return the others."""
    unknown = sorted(k for k in obj if k not in used)
    for k in unknown:
        if k in CONVERSATION_KEYS:
            raise _Invalid(
                UNUSED_KEY, f"{path}{k}",
                f"is not read by a {form}, and ignoring it would change the conversation; remove it or use the "
                "record form that reads it (see docs/data.md)",
            )
    return tuple(f"{path}{k}" for k in unknown)


def _longpo_record(obj: dict, source: str) -> LongPORecord:
    rid = _record_id(obj)
    document = _text(obj, "document", "document")
    system = obj.get("system")
    if system is not None:
        system = _text(obj, "system", "system")
    if "turns" not in obj:
        raise _Invalid(MISSING_FIELD, "turns", "is missing")
    turns_v = obj["turns"]
    if not isinstance(turns_v, list):
        raise _Invalid(WRONG_TYPE, "turns", f"must be a list of turn objects, got {_type_name(turns_v)}")
    if not turns_v:
        raise _Invalid(EMPTY_TURNS, "turns", "is empty (a record needs at least one turn)")
    turns, ignored = [], list(_check_keys(obj, LONGPO_KEYS, "LongPO record"))
    for i, t in enumerate(turns_v):
        p = f"turns[{i}]"
        if not isinstance(t, dict):
            raise _Invalid(WRONG_TYPE, p, f"must be an object, got {_type_name(t)}")
        if not t:
            raise _Invalid(EMPTY_TURNS, p, "is an empty turn")
        ignored += [f"turns[].{k.split('.', 1)[1]}" for k in _check_keys(t, TURN_KEYS, "LongPO turn", f"{p}.")]
        turns.append(
            Turn(
                short_context=_text(t, "short_context", f"{p}.short_context"),
                instruction=_text(t, "instruction", f"{p}.instruction"),
                chosen=_text(t, "chosen", f"{p}.chosen"),
                rejected=_text(t, "rejected", f"{p}.rejected"),
            )
        )
    template = None
    meta = obj.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise _Invalid(WRONG_TYPE, "meta", f"must be an object, got {_type_name(meta)}")
        template = meta.get("chat_template")
        if template is not None and (not isinstance(template, dict) or not isinstance(template.get("name"), str)):
            raise _Invalid(WRONG_TYPE, "meta.chat_template", "must be an object with a 'name' (and 'fingerprint')")
    return LongPORecord(id=rid, document=document, turns=tuple(turns), system=system, source=source,
                        ignored_keys=tuple(sorted(set(ignored))), chat_template=template)


def _official_record(obj: dict, source: str) -> LongPORecord:
    """The authors' intermediate JSON: one turn; user = prompt + SEP + question."""
    ignored = _check_keys(obj, OFFICIAL_KEYS, "LongPO intermediate-JSON record (prompt/short_prompt/question)")
    if "id" in obj:
        rid = _record_id(obj)
    elif "prompt_id" in obj:
        rid = _record_id({"id": obj["prompt_id"]})
    else:
        raise _Invalid(MISSING_FIELD, "id", "is missing (the intermediate-JSON form needs 'id' or 'prompt_id')")
    document = _text(obj, "prompt", "prompt")
    if "short_prompt" not in obj:
        raise _Invalid(MISSING_FIELD, "short_prompt",
                       "is missing (a record with 'question' is the authors' intermediate JSON: prompt, short_prompt, "
                       "question, chosen, rejected)")
    turn = Turn(short_context=_text(obj, "short_prompt", "short_prompt"), instruction=_text(obj, "question", "question"),
                chosen=_text(obj, "chosen", "chosen"), rejected=_text(obj, "rejected", "rejected"))
    return LongPORecord(id=rid, document=document, turns=(turn,), source=source, ignored_keys=ignored)


def _pair_record(obj: dict, source: str) -> PairRecord:
    rid = _record_id(obj)
    if "prompt" not in obj:
        raise _Invalid(MISSING_FIELD, "prompt", "is missing")
    prompt = _messages(obj["prompt"], "prompt")
    chosen = _response(obj, "chosen")
    rejected = _response(obj, "rejected")
    short = obj.get("short_prompt")
    short_prompt = None if short is None else _messages(short, "short_prompt")
    ignored = _check_keys(obj, PAIR_KEYS, "plain pair record")
    return PairRecord(id=rid, prompt=prompt, chosen=chosen, rejected=rejected, short_prompt=short_prompt, source=source,
                      ignored_keys=ignored)


def parse_record(obj: Any, source: str) -> Union[Record, InvalidRecord]:
    """Validate one decoded JSON value; never raises for bad data (returns InvalidRecord)."""
    try:
        if not isinstance(obj, dict):
            raise _Invalid(NOT_AN_OBJECT, None, f"a record must be a JSON object, got {_type_name(obj)}")
        is_longpo = "turns" in obj or "document" in obj
        is_pair = "prompt" in obj
        if is_longpo and is_pair:
            raise _Invalid(
                UNKNOWN_FORMAT, None,
                "record has both 'document'/'turns' (LongPO record) and 'prompt' (plain pair record); keep one form",
            )
        if is_longpo:
            return _longpo_record(obj, source)
        if is_pair and "question" in obj:
            return _official_record(obj, source)
        if is_pair:
            return _pair_record(obj, source)
        raise _Invalid(
            UNKNOWN_FORMAT, None,
            "record has neither 'document' + 'turns' (LongPO record) nor 'prompt' + 'chosen' + 'rejected' "
            "(plain pair record); see docs/data.md",
        )
    except _Invalid as e:
        where = f"field '{e.field}' " if e.field else ""
        return InvalidRecord(source=source, reason=e.reason, message=f"{source}: {where}{e.problem}", raw=obj)


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRecord:
    source: str  # "FILE:LINE"
    value: Any  # decoded JSON, or the raw line text when malformed
    error: Optional[str] = None  # JSON error text when the line is malformed


def _first_char(path: Path) -> str:
    with open(path, "r", encoding="utf-8") as f:
        while True:
            c = f.read(1)
            if not c or not c.isspace():
                return c


def iter_raw(path: Union[str, Path]) -> Iterator[RawRecord]:
    """Decoded values of a JSONL file (one per non-blank line) or of a top-level JSON array.

    JSONL lines are decoded one at a time (records can be megabytes; the file need not fit in
    memory). A JSON array is decoded element by element so each keeps its starting line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    try:
        first = _first_char(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    if first == "[":
        yield from _iter_array(path)
        return
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                yield RawRecord(source, json.loads(line))
            except json.JSONDecodeError as e:
                yield RawRecord(source, line.rstrip("\n"), f"malformed JSON: {e.msg} (column {e.colno})")


def _iter_array(path: Path) -> Iterator[RawRecord]:
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    line, line_pos = 1 + text.count("\n", 0, pos), pos

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i].isspace():
            i += 1
        return i

    def fail(i: int, msg: str) -> DataError:
        ln = 1 + text.count("\n", 0, i)
        col = i - (text.rfind("\n", 0, i) + 1) + 1
        return DataError(
            f"{path}:{ln}: malformed JSON array: {msg} (column {col}); the records after this point "
            "cannot be located, so --skip-invalid cannot skip it: fix the file"
        )

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        try:
            value, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from e
        yield RawRecord(f"{path}:{line}", value)
        pos = skip_ws(end)
        if pos >= len(text):
            raise fail(pos, "missing closing ']'")
        if text[pos] == "]":
            if skip_ws(pos + 1) != len(text):
                raise fail(skip_ws(pos + 1), "extra data after the closing ']'")
            return
        if text[pos] != ",":
            raise fail(pos, "expected ',' or ']' between records")
        pos += 1


def iter_input(path: Union[str, Path], split: str = "train") -> Iterator[RawRecord]:
    """Raw records of one input: JSONL / JSON array (FILE:LINE), or a table (parquet file, a
    directory of them, or a ``datasets.save_to_disk`` directory: one record per row, FILE:row N)."""
    if not is_table_input(path):
        yield from iter_raw(path)
        return
    for table in find_tables([str(path)], split):
        for row, value in iter_table_rows(table):
            yield RawRecord(f"{table}:row {row}", value)


def read_records(paths: list[Union[str, Path]], auto_id: bool = False,
                 split: str = "train") -> Iterator[tuple[Union[Record, InvalidRecord], Any]]:
    """(validated record or InvalidRecord, decoded value) of all inputs in order.

    Ids must be unique over all files: a repeated id makes the later record an InvalidRecord.
    ``auto_id`` gives a record without ``id`` (TRL-style files) its source, ``FILE:LINE`` or
    ``FILE:row N``, as id: unique and traceable.
    """
    seen: dict[str, str] = {}
    for path in paths:
        for raw in iter_input(path, split):
            if auto_id and raw.error is None and isinstance(raw.value, dict) and raw.value.get("id") in (None, ""):
                raw = RawRecord(raw.source, {**raw.value, "id": raw.source})
            if raw.error is not None:
                yield InvalidRecord(raw.source, MALFORMED_JSON, f"{raw.source}: {raw.error}", raw.value), raw.value
                continue
            rec = parse_record(raw.value, raw.source)
            if isinstance(rec, InvalidRecord):
                yield rec, raw.value
                continue
            if rec.id in seen:
                yield InvalidRecord(
                    raw.source, DUPLICATE_ID,
                    f"{raw.source}: field 'id': duplicate id {rec.id!r} (first seen at {seen[rec.id]}); ids must be unique",
                    raw.value,
                ), raw.value
                continue
            seen[rec.id] = raw.source
            yield rec, raw.value
