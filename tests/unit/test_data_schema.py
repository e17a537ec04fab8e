"""Record schema: every bad-input case names FILE:LINE, the field and the problem."""

import json

import pytest

from megatron_longpo.data.schema import (
    BAD_MESSAGES,
    DUPLICATE_ID,
    EMPTY_FIELD,
    EMPTY_TURNS,
    MALFORMED_JSON,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    UNKNOWN_FORMAT,
    UNUSED_KEY,
    WRONG_TYPE,
    DataError,
    InvalidRecord,
    LongPORecord,
    PairRecord,
    Turn,
    parse_record,
    read_records,
)


def good_longpo(**kw):
    rec = {"id": "r1", "document": "Long text.", "turns": [
        {"short_context": "Short.", "instruction": "Q1?", "chosen": "A", "rejected": "B"},
        {"short_context": "Other.", "instruction": "Q2?", "chosen": "C", "rejected": "D"},
    ]}
    rec.update(kw)
    return rec


def good_pair(**kw):
    rec = {"id": "p1", "prompt": "Doc and question?", "chosen": "yes", "rejected": "no"}
    rec.update(kw)
    return rec


def invalid(obj):
    r = parse_record(obj, "f.jsonl:7")
    assert isinstance(r, InvalidRecord), r
    assert r.message.startswith("f.jsonl:7: ")
    return r


def test_valid_records_parse():
    r = parse_record(good_longpo(system="Be brief."), "f:1")
    assert isinstance(r, LongPORecord) and len(r.turns) == 2 and r.system == "Be brief." and r.turns[1].chosen == "C"
    p = parse_record(good_pair(short_prompt="q?"), "f:2")
    assert isinstance(p, PairRecord) and p.prompt[0].role == "user" and p.short_prompt[0].content == "q?"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}]
    p = parse_record(good_pair(prompt=msgs, chosen=[{"role": "assistant", "content": "c"}], id=5), "f:3")
    assert [m.role for m in p.prompt] == ["system", "user", "assistant", "user"] and p.chosen == "c" and p.id == "5"


@pytest.mark.parametrize(
    "mutate, reason, text",
    [
        (lambda r: r.pop("document"), MISSING_FIELD, "field 'document' is missing"),
        (lambda r: r.pop("id"), MISSING_FIELD, "field 'id' is missing"),
        (lambda r: r.pop("turns"), MISSING_FIELD, "field 'turns' is missing"),
        (lambda r: r["turns"][1].pop("chosen"), MISSING_FIELD, "field 'turns[1].chosen' is missing"),
        (lambda r: r["turns"][0].pop("short_context"), MISSING_FIELD, "field 'turns[0].short_context' is missing"),
        (lambda r: r.update(document=""), EMPTY_FIELD, "field 'document' is empty"),
        (lambda r: r["turns"][1].update(instruction="  \n"), EMPTY_FIELD, "field 'turns[1].instruction' is empty"),
        (lambda r: r.update(id=""), EMPTY_FIELD, "field 'id' is empty"),
        (lambda r: r.update(document=5), WRONG_TYPE, "field 'document' must be a string, got int"),
        (lambda r: r.update(turns="abc"), WRONG_TYPE, "field 'turns' must be a list of turn objects, got string"),
        (lambda r: r["turns"].__setitem__(0, "x"), WRONG_TYPE, "field 'turns[0]' must be an object, got string"),
        (lambda r: r["turns"][0].update(rejected=None), WRONG_TYPE, "field 'turns[0].rejected' must be a string, got null"),
        (lambda r: r.update(id=True), WRONG_TYPE, "field 'id' must be a string or an integer, got boolean"),
        (lambda r: r.update(system=["x"]), WRONG_TYPE, "field 'system' must be a string, got array"),
        (lambda r: r.update(turns=[]), EMPTY_TURNS, "field 'turns' is empty (a record needs at least one turn)"),
        (lambda r: r["turns"].__setitem__(1, {}), EMPTY_TURNS, "field 'turns[1]' is an empty turn"),
        (lambda r: r.update(prompt="x"), UNKNOWN_FORMAT, "both 'document'/'turns'"),
    ],
)
def test_longpo_record_errors(mutate, reason, text):
    rec = good_longpo()
    mutate(rec)
    r = invalid(rec)
    assert r.reason == reason
    assert text in r.message, r.message


@pytest.mark.parametrize(
    "mutate, reason, text",
    [
        (lambda r: r.pop("prompt"), UNKNOWN_FORMAT, "neither 'document' + 'turns'"),
        (lambda r: r.pop("rejected"), MISSING_FIELD, "field 'rejected' is missing"),
        (lambda r: r.update(prompt=""), EMPTY_FIELD, "field 'prompt' is empty"),
        (lambda r: r.update(prompt=[]), EMPTY_FIELD, "field 'prompt' is an empty message list"),
        (lambda r: r.update(prompt=3), WRONG_TYPE, "field 'prompt' must be a string or a list of chat messages, got int"),
        (lambda r: r.update(chosen=7), WRONG_TYPE, "field 'chosen' must be a string, got int"),
        (lambda r: r.update(chosen=[{"role": "user", "content": "x"}]), BAD_MESSAGES, "exactly one assistant message"),
        (lambda r: r.update(prompt=[{"role": "bot", "content": "x"}]), BAD_MESSAGES, "field 'prompt[0].role' must be"),
        (lambda r: r.update(prompt=[{"role": "user", "content": ""}]), EMPTY_FIELD, "field 'prompt[0].content' is empty"),
        (lambda r: r.update(prompt=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
         BAD_MESSAGES, "must end with a user message"),
        (lambda r: r.update(prompt=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
         BAD_MESSAGES, "roles must alternate"),
        (lambda r: r.update(prompt=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]),
         BAD_MESSAGES, "'system' message may only come first"),
        (lambda r: r.update(short_prompt=5), WRONG_TYPE, "field 'short_prompt' must be a string or a list"),
    ],
)
def test_pair_record_errors(mutate, reason, text):
    rec = good_pair()
    mutate(rec)
    r = invalid(rec)
    assert r.reason == reason
    assert text in r.message, r.message


def test_not_an_object():
    r = invalid([1, 2])
    assert r.reason == NOT_AN_OBJECT and "a record must be a JSON object, got array" in r.message


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_malformed_and_duplicates_name_file_and_line(tmp_path):
    p = _write(tmp_path, "in.jsonl", [
        json.dumps(good_longpo(id="a")),
        "",  # blank lines are skipped but counted in line numbers
        '{"id": "b", "document": "x", ',
        json.dumps(good_pair(id="a")),
        json.dumps(good_pair(id="c")),
    ])
    out = [r for r, _ in read_records([p])]
    assert [type(r).__name__ for r in out] == ["LongPORecord", "InvalidRecord", "InvalidRecord", "PairRecord"]
    assert out[1].reason == MALFORMED_JSON and out[1].message.startswith(f"{p}:3: malformed JSON")
    assert out[2].reason == DUPLICATE_ID
    assert out[2].message == f"{p}:4: field 'id': duplicate id 'a' (first seen at {p}:1); ids must be unique"


def test_duplicate_ids_across_files(tmp_path):
    a = _write(tmp_path, "a.jsonl", [json.dumps(good_pair(id="x"))])
    b = _write(tmp_path, "b.jsonl", [json.dumps(good_pair(id="x"))])
    out = [r for r, _ in read_records([a, b])]
    assert out[1].reason == DUPLICATE_ID and f"first seen at {a}:1" in out[1].message


def test_json_array_input_keeps_line_numbers(tmp_path):
    p = tmp_path / "in.json"
    # record 0 spans lines 2-3 (indented), record 1 is on line 4, record 2 starts on line 6
    p.write_text("[\n" + json.dumps(good_longpo(id="a")).replace(', "turns"', ',\n "turns"') + ",\n"
                 + json.dumps(good_pair(id="b")) + ",\n\n  " + json.dumps({"id": "c"}) + "\n]\n")
    out = [r for r, _ in read_records([p])]
    assert isinstance(out[0], LongPORecord) and isinstance(out[1], PairRecord)
    assert out[1].source == f"{p}:4"
    assert out[2].message.startswith(f"{p}:6: ") and out[2].reason == UNKNOWN_FORMAT


def test_json_array_syntax_error_is_fatal(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n{"id": "a", "prompt": "x", "chosen": "y", "rejected": "z"},\n{"id": "b",,}\n]')
    with pytest.raises(DataError, match=r"bad.json:3: malformed JSON array: .*cannot skip"):
        list(read_records([p]))


def test_missing_input_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_records([tmp_path / "nope.jsonl"]))


def test_authors_intermediate_json_is_a_one_turn_longpo_record():
    obj = {"prompt_id": 7, "prompt": "Long document.", "short_prompt": "Chunk.", "question": "What?",
           "chosen": "A.", "rejected": "B."}
    rec = parse_record(obj, "f.jsonl:3")
    assert isinstance(rec, LongPORecord) and rec.id == "7" and rec.document == "Long document."
    assert rec.turns == (Turn("Chunk.", "What?", "A.", "B."),) and rec.system is None
    assert parse_record(dict(obj, id="x"), "f:1").id == "x"
    bad = parse_record({k: v for k, v in obj.items() if k != "short_prompt"}, "f.jsonl:4")
    assert isinstance(bad, InvalidRecord) and bad.reason == MISSING_FIELD
    assert "field 'short_prompt' is missing (a record with 'question' is the authors' intermediate JSON" in bad.message


def test_conversation_keys_are_never_silently_dropped():
    pair = {"id": "p", "prompt": "P", "chosen": "A", "rejected": "B"}
    for extra in ({"system": "S"}, {"messages": []}, {"instruction": "I"}):
        bad = parse_record(dict(pair, **extra), "f.jsonl:2")
        assert isinstance(bad, InvalidRecord) and bad.reason == UNUSED_KEY
        key = next(iter(extra))
        assert f"f.jsonl:2: field '{key}' is not read by a plain pair record" in bad.message
    longpo = {"id": "l", "document": "D", "question": "Q?",
              "turns": [{"short_context": "s", "instruction": "i", "chosen": "a", "rejected": "b"}]}
    bad = parse_record(longpo, "f:1")
    assert bad.reason == UNUSED_KEY and "'question' is not read by a LongPO record" in bad.message
    longpo.pop("question")
    longpo["turns"][0]["system"] = "per-turn system"
    bad = parse_record(longpo, "f:1")
    assert bad.reason == UNUSED_KEY and "field 'turns[0].system'" in bad.message
    # other keys are metadata: kept out of the conversation, reported by name
    longpo["turns"][0] = {"short_context": "s", "instruction": "i", "chosen": "a", "rejected": "b", "score": 1}
    rec = parse_record(dict(longpo, source="books", meta={}), "f:1")
    assert rec.ignored_keys == ("source", "turns[].score")  # meta is read (the generation chat template)
    tpl = {"name": "chatml", "fingerprint": "ab12"}
    assert parse_record(dict(longpo, meta={"chat_template": tpl}), "f:1").chat_template == tpl
    bad = parse_record(dict(longpo, meta={"chat_template": "chatml"}), "f:1")
    assert bad.reason == "wrong_type" and "meta.chat_template" in bad.message
    assert parse_record(dict(pair, source="x"), "f:1").ignored_keys == ("source",)


def test_template_mismatch_rules():
    from megatron_longpo.data.preprocess import template_mismatch

    turns = [{"short_context": "s", "instruction": "i", "chosen": "a", "rejected": "b"}]
    mine = {"name": "mistral", "fingerprint": "f" * 64}

    def rec(meta):
        return parse_record({"id": "r", "document": "D", "turns": turns, **({"meta": meta} if meta else {})}, "g.jsonl:4")

    assert template_mismatch(rec(None), mine, "--chat-template auto") is None  # hand-written data: nothing recorded
    assert template_mismatch(rec({"chat_template": mine}), mine, "--chat-template auto") is None
    server = {"chat_template": {"name": "openai-chat-server", "fingerprint": None}}
    assert template_mismatch(rec(server), mine, "--chat-template auto") is None  # cannot be checked (warned)
    why = template_mismatch(rec({"chat_template": {"name": "chatml", "fingerprint": "c" * 64}}), mine,
                            "--chat-template auto")
    assert why.startswith("g.jsonl:4: record 'r' was generated with the chat template 'chatml'")
    assert "--chat-template auto renders 'mistral'" in why and "pass --chat-template chatml" in why
