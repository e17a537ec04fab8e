"""Pair building: round trips against independently rendered text, exact response masks,
shared-prefix invariants, reference sequences without history, templates, over-long records."""

from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.data.schema import DataError, parse_record
from megatron_longpo.data.sequences import (
    IDENTICAL,
    OVERLONG,
    OVERLONG_UNGROUNDED,
    OVERLONG_UNTRUNCATABLE,
    OverlongError,
    _cut_plan,
    build_sample,
    render_record,
)
from megatron_longpo.data.synthetic import corpus, make_hf_tokenizer, random_text, train_sentencepiece
from megatron_longpo.data.templates import get_template, rendered_text
from megatron_longpo.data.tokenizer import Tokenizer

SAMPLE_TOKENIZER = Path(__file__).resolve().parents[2] / "examples" / "data" / "tokenizer.model"

CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
)
TRIM_JINJA = (  # Llama-3 style: contents are trimmed, end-of-turn after every message
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n\\n' + m['content'] | trim"
    " + '<|im_end|>' }}{% endfor %}"
)
NO_SYSTEM_JINJA = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{{ m['content'] }}{% endfor %}"
)
UPPER_JINJA = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '</s>' }}{% endfor %}"
NEWLINE_JINJA = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | replace('\\n', ' ') + '</s>' }}{% endfor %}"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(SAMPLE_TOKENIZER)


@pytest.fixture(scope="module")
def dummy_prefix_tok(tmp_path_factory):
    p = tmp_path_factory.mktemp("sp") / "dp.model"
    train_sentencepiece(corpus(), vocab_size=400, dummy_prefix=True, path=p)
    return Tokenizer(p)


def hf_tok(tmp_path_factory, template, name):
    d = tmp_path_factory.mktemp(name)
    make_hf_tokenizer(d, corpus(), template)
    return Tokenizer(d)


def longpo(system=None, **kw):
    rec = {
        "id": "r1",
        "document": "Annual report.\nSection 1: Water\nThe reservoir holds 4200 cubic metres.\n"
                    "Section 2: Staff\nThe engineer Ada Novak was appointed in 1987.",
        "turns": [
            {"short_context": "Section 2: Staff\nThe engineer Ada Novak was appointed in 1987.",
             "instruction": "As described in the preceding text, when was Ada Novak appointed?",
             "chosen": "Section 2 says 1987.", "rejected": "Probably in 1990."},
            {"short_context": "Section 1: Water\nThe reservoir holds 4200 cubic metres.",
             "instruction": "How much does the reservoir hold?",
             "chosen": "It holds 4200 cubic metres.", "rejected": "The text does not say."},
        ],
    }
    if system:
        rec["system"] = system
    rec.update(kw)
    return parse_record(rec, "test.jsonl:1")


def mask_runs(ids, mask):
    """Contiguous runs of masked tokens, as lists."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def enc(tok, text):
    return [int(x) for x in tok.encode(text)]


def mistral_text(turns, system=None, document=None, responses=None):
    """Independent rendering of the Mistral-Instruct format."""
    out = "<s>"
    for i, (user, answer) in enumerate(turns):
        sys = f"{system}\n\n" if (system and i == 0) else ""
        out += f"[INST] {sys}{user} [/INST]{answer}</s>"
    return out


def test_mistral_round_trip_multi_turn(tok):
    rec = longpo(system="Quote the section.")
    res = build_sample(rec, tok, get_template("mistral", tok))
    s = res.sample
    d, t = rec.document, rec.turns
    for seq, key in ((s.chosen, "chosen"), (s.rejected, "rejected")):
        want = mistral_text([(d + "\n\n" + t[0].instruction, getattr(t[0], key)),
                             (t[1].instruction, getattr(t[1], key))], system=rec.system)
        assert tok.decode(seq) == want
    rendered = render_record(rec, get_template("mistral", tok))
    assert rendered_text(rendered.chosen) == tok.decode(s.chosen)


@pytest.mark.parametrize("template", ["mistral", "chatml"])
def test_response_masks_cover_exactly_answers_and_eos(tok, template):
    rec = longpo(system="Be brief.")
    tpl = get_template(template, tok)
    s = build_sample(rec, tok, tpl).sample
    close = tok.eos_id if template == "mistral" else tok.single_token("<|im_end|>")
    for seq, mask, key in ((s.chosen, s.chosen_mask, "chosen"), (s.rejected, s.rejected_mask, "rejected")):
        want = [enc(tok, getattr(t, key)) + [close] for t in rec.turns]
        assert mask_runs(seq, mask) == want
        assert int(mask.sum()) == sum(map(len, want))


def test_shared_prefix_reconstructs_both_sequences(tok):
    rec = longpo()
    s = build_sample(rec, tok, get_template("mistral", tok)).sample
    S_w, S_l = s.chosen, s.rejected
    first = int(np.argmax(s.chosen_mask))
    P = s.prefix_length
    assert P == first - 1
    assert np.array_equal(S_w[:P], S_l[:P]) and S_w[P] == S_l[P]
    assert np.array_equal(np.concatenate([s.prefix, s.chosen_branch]), S_w)
    assert np.array_equal(np.concatenate([s.prefix, s.rejected_branch]), S_l)
    # the branch starts with the last prompt token; its successor is the first response token
    assert tok.decode(S_w[: P + 1]).endswith(" [/INST]")
    assert S_w[P + 1] == enc(tok, rec.turns[0].chosen)[0] and S_l[P + 1] == enc(tok, rec.turns[0].rejected)[0]
    assert s.two_sequences_length == max(len(S_w), len(S_l))
    assert s.shared_prefix_length == P + len(S_w) - P + len(S_l) - P


def test_reference_sequences_have_no_history(tok):
    rec = longpo(system="Be brief.")
    s = build_sample(rec, tok, get_template("mistral", tok)).sample
    assert s.num_turns == 2
    for t, ref in zip(rec.turns, s.references):
        for seq, mask, ans in ((ref.chosen, ref.chosen_mask, t.chosen), (ref.rejected, ref.rejected_mask, t.rejected)):
            assert tok.decode(seq) == mistral_text([(t.short_context + "\n\n" + t.instruction, ans)], system=rec.system)
            assert mask_runs(seq, mask) == [enc(tok, ans) + [tok.eos_id]]
    # turn 2's reference holds neither the document nor turn 1
    text = tok.decode(s.references[1].chosen)
    assert rec.turns[0].instruction not in text and "Ada Novak" not in text and rec.turns[0].chosen not in text


def test_plain_pair_records(tok):
    tpl = get_template("mistral", tok)
    rec = parse_record({"id": "p", "prompt": "Doc text.\n\nQuestion?", "chosen": "Yes.", "rejected": "No.",
                        "short_prompt": "Part.\n\nQuestion?"}, "f:1")
    s = build_sample(rec, tok, tpl).sample
    assert tok.decode(s.chosen) == "<s>[INST] Doc text.\n\nQuestion? [/INST]Yes.</s>"
    assert tok.decode(s.rejected) == "<s>[INST] Doc text.\n\nQuestion? [/INST]No.</s>"
    assert tok.decode(s.references[0].chosen) == "<s>[INST] Part.\n\nQuestion? [/INST]Yes.</s>"
    assert tok.decode(s.references[0].rejected) == "<s>[INST] Part.\n\nQuestion? [/INST]No.</s>"
    no_short = parse_record({"id": "q", "prompt": "Doc.", "chosen": "Yes.", "rejected": "No."}, "f:2")
    assert build_sample(no_short, tok, tpl).sample.references == []
    # history in the prompt: earlier assistant turns are context, not responses
    chat = parse_record({"id": "c", "prompt": [
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Doc. Question?"}], "chosen": "Yes.", "rejected": "No."}, "f:3")
    s = build_sample(chat, tok, tpl).sample
    assert tok.decode(s.chosen) == "<s>[INST] Hi. [/INST]Hello.</s>[INST] Doc. Question? [/INST]Yes.</s>"
    assert mask_runs(s.chosen, s.chosen_mask) == [enc(tok, "Yes.") + [tok.eos_id]]


def test_chatml_round_trip(tok):
    rec = longpo(system="Sys.")
    s = build_sample(rec, tok, get_template("chatml", tok)).sample
    d, t = rec.document, rec.turns
    want = ("<|im_start|>system\nSys.<|im_end|>\n"
            f"<|im_start|>user\n{d}\n\n{t[0].instruction}<|im_end|>\n<|im_start|>assistant\n{t[0].chosen}<|im_end|>\n"
            f"<|im_start|>user\n{t[1].instruction}<|im_end|>\n<|im_start|>assistant\n{t[1].chosen}<|im_end|>\n")
    assert tok.decode(s.chosen) == want


def _hf_messages(rec, key):
    msgs = [{"role": "user", "content": rec.document + "\n\n" + rec.turns[0].instruction}]
    for i, t in enumerate(rec.turns):
        if i:
            msgs.append({"role": "user", "content": t.instruction})
        msgs.append({"role": "assistant", "content": getattr(t, key)})
    return msgs


@pytest.mark.parametrize("jinja, name", [(CHATML_JINJA, "verbatim"), (TRIM_JINJA, "trim")])
def test_hf_chat_template_matches_jinja_render(tmp_path_factory, jinja, name):
    tok = hf_tok(tmp_path_factory, jinja, name)
    tpl = get_template("auto", tok)
    assert tpl.name == "tokenizer"
    rec = longpo()
    if name == "trim":  # contents with surrounding whitespace: the template trims them
        rec = longpo(turns=[{"short_context": "s", "instruction": "  Q?\n", "chosen": " Yes. ", "rejected": "\nNo."}])
    s = build_sample(rec, tok, tpl).sample
    im_end = tok.single_token("<|im_end|>")
    for seq, mask, key in ((s.chosen, s.chosen_mask, "chosen"), (s.rejected, s.rejected_mask, "rejected")):
        assert tok.decode(seq) == tok._hf.apply_chat_template(_hf_messages(rec, key), tokenize=False)
        answers = [getattr(t, key).strip() if name == "trim" else getattr(t, key) for t in rec.turns]
        assert mask_runs(seq, mask) == [enc(tok, a) + [im_end] for a in answers]


def test_hf_template_errors(tmp_path_factory):
    tok = hf_tok(tmp_path_factory, NO_SYSTEM_JINJA, "nosys")
    with pytest.raises(DataError, match=r"test.jsonl:1: record 'r1': the chat template of .* rejects a conversation "
                                        r"with roles \['system', 'user', 'assistant'.*no system role.*--chat-template"):
        build_sample(longpo(system="S."), tok, get_template("tokenizer", tok))
    tok = hf_tok(tmp_path_factory, UPPER_JINJA, "upper")
    with pytest.raises(DataError, match=r"does not render message 0 \(user\) exactly once"):
        build_sample(longpo(), tok, get_template("tokenizer", tok))
    tok = hf_tok(tmp_path_factory, NEWLINE_JINJA, "newline")
    with pytest.raises(DataError, match=r"changes the content of message 0 \(user\) beyond stripping it"):
        build_sample(longpo(), tok, get_template("tokenizer", tok))
    plain = hf_tok(tmp_path_factory, None, "plain")
    with pytest.raises(DataError, match="has no chat template; use --chat-template mistral or chatml"):
        get_template("tokenizer", plain)
    assert get_template("auto", plain).name == "mistral"


def test_chatml_needs_single_marker_tokens(tmp_path):
    p = tmp_path / "nomark.model"
    train_sentencepiece(corpus(), vocab_size=400, path=p, chat_markers=False)
    t = Tokenizer(p)
    with pytest.raises(DataError, match=r"no single token for '<\|im_start\|>'.*use --chat-template mistral"):
        get_template("chatml", t)


def test_dummy_prefix_tokenizer_round_trips_with_exact_masks(dummy_prefix_tok):
    """A sentencepiece model with a dummy prefix (Llama-2 / Mistral): the whole conversation is one
    string, so the decoded sequence is the rendered text (no space at message boundaries)."""
    t = dummy_prefix_tok
    rec = longpo()
    s = build_sample(rec, t, get_template("mistral", t)).sample
    want = mistral_text([(rec.document + "\n\n" + rec.turns[0].instruction, rec.turns[0].chosen),
                         (rec.turns[1].instruction, rec.turns[1].chosen)])
    assert t.decode(s.chosen) == want
    assert [t.decode(r) for r in mask_runs(s.chosen, s.chosen_mask)] == [x.chosen + "</s>" for x in rec.turns]
    assert [t.decode(r) for r in mask_runs(s.rejected, s.rejected_mask)] == [x.rejected + "</s>" for x in rec.turns]


SEC1 = "Section 1: Water\nThe reservoir holds 4200 cubic metres."
SEC2 = "Section 2: Staff\nThe engineer Ada Novak was appointed in 1987."


def grounded_doc():
    return "\n".join([random_text(200, seed=3), SEC2, random_text(120, seed=4), SEC1, random_text(120, seed=5)])


def deleted_positions(full, short):
    """Positions of ``full`` deleted to get ``short`` (greedy alignment; None if not a subsequence)."""
    out, j = [], 0
    for i, x in enumerate(full):
        if j < len(short) and short[j] == x:
            j += 1
        else:
            out.append(i)
    return out if j == len(short) else None


def test_overlong_modes(tok):
    rec = longpo(document=grounded_doc())
    tpl = get_template("mistral", tok)
    full = build_sample(rec, tok, tpl).sample
    L = full.two_sequences_length
    limit = L - 57
    with pytest.raises(OverlongError, match=rf"test.jsonl:1: record 'r1' needs {L} tokens .* more than "
                                            rf"--max-seq-length {limit}; pass --overlong drop"):
        build_sample(rec, tok, tpl, max_seq_length=limit, overlong="error")
    dropped = build_sample(rec, tok, tpl, max_seq_length=limit, overlong="drop")
    assert dropped.sample is None and dropped.drop_reason == OVERLONG
    res = build_sample(rec, tok, tpl, max_seq_length=limit, overlong="truncate_document")
    s = res.sample
    assert res.truncated_tokens == 57 and s.two_sequences_length == limit
    # 57 document tokens deleted; everything else (template, instructions, responses) untouched
    bos_inst = 1 + len(enc(tok, "[INST] "))  # the document follows BOS and "[INST] "
    n_doc = len(tok.encode(rec.document))
    for f, t in ((full.chosen, s.chosen), (full.rejected, s.rejected)):
        gone = deleted_positions(f.tolist(), t.tolist())
        assert gone is not None and len(gone) == 57 and bos_inst <= min(gone) and max(gone) < bos_inst + n_doc
    assert mask_runs(s.chosen, s.chosen_mask) == mask_runs(full.chosen, full.chosen_mask)
    assert mask_runs(s.rejected, s.rejected_mask) == mask_runs(full.rejected, full.rejected_mask)
    # every turn's short context survives, and the document keeps its first and last tokens
    text = tok.decode(s.chosen)
    assert all(t.short_context in text for t in rec.turns)
    assert text.startswith("<s>[INST] " + rec.document[:20]) and rec.document[-20:] + "\n\n" in text
    assert build_sample(rec, tok, tpl, max_seq_length=L, overlong="error").truncated_tokens == 0
    # responses + prompt alone exceed the limit: cannot be fixed by truncating the document
    tiny = build_sample(rec, tok, tpl, max_seq_length=L - n_doc - 5, overlong="truncate_document")
    assert tiny.sample is None and tiny.drop_reason == OVERLONG_UNTRUNCATABLE
    assert "removing the whole document" in tiny.message


def test_truncation_keeps_every_short_context_or_drops(tok):
    tpl = get_template("mistral", tok)
    rec = longpo(document=grounded_doc())
    full = build_sample(rec, tok, tpl).sample
    L = full.two_sequences_length
    sc_tokens = sum(len(tok.encode(t.short_context)) for t in rec.turns)
    n_doc = len(tok.encode(rec.document))
    # the most that can go: every document token outside the two short contexts (+-2 boundary tokens)
    for cut in (1, n_doc - sc_tokens - 4):
        s = build_sample(rec, tok, tpl, max_seq_length=L - cut, overlong="truncate_document").sample
        assert s is not None and s.two_sequences_length == L - cut
        text = tok.decode(s.chosen)
        assert SEC1 in text and SEC2 in text
        for ref, t in zip(s.references, rec.turns):  # references are never truncated
            assert t.short_context in tok.decode(ref.chosen)
    res = build_sample(rec, tok, tpl, max_seq_length=L - (n_doc - sc_tokens + 4), overlong="truncate_document")
    assert res.sample is None and res.drop_reason == OVERLONG_UNGROUNDED
    assert "tokens outside the short contexts" in res.message
    # a short context that is not in the document: it cannot be kept, so the record is dropped
    lost = longpo(document=random_text(400, seed=3))
    L2 = build_sample(lost, tok, tpl).sample.two_sequences_length
    res = build_sample(lost, tok, tpl, max_seq_length=L2 - 10, overlong="truncate_document")
    assert res.sample is None and res.drop_reason == OVERLONG_UNGROUNDED
    assert "short context of turn 1 does not occur in the document" in res.message
    # the authors' chunks join paragraphs with a space: found up to whitespace
    spaced = longpo(document=grounded_doc().replace(SEC2, SEC2.replace("\n", "\n\n")))
    L3 = build_sample(spaced, tok, tpl).sample.two_sequences_length
    s = build_sample(spaced, tok, tpl, max_seq_length=L3 - 100, overlong="truncate_document").sample
    assert SEC2.replace("\n", "\n\n") in tok.decode(s.chosen)


def test_cut_plan_is_proportional_and_central():
    assert _cut_plan([(0, 10)], 4) == [(3, 7)]  # keeps ceil(6/2) head, floor(6/2) tail
    cuts = _cut_plan([(0, 10), (20, 50)], 8)
    assert sum(b - a for a, b in cuts) == 8 and cuts == [(4, 6), (32, 38)]
    assert sum(b - a for a, b in _cut_plan([(0, 3), (5, 8), (10, 13)], 9)) == 9


def test_chosen_equals_rejected_counted_or_dropped(tok):
    same = longpo(turns=[{"short_context": "s", "instruction": "q", "chosen": "A.", "rejected": "A."}])
    tpl = get_template("mistral", tok)
    res = build_sample(same, tok, tpl)
    assert res.identical and res.identical_turns == 1 and res.sample is not None
    assert np.array_equal(res.sample.chosen, res.sample.rejected)
    res = build_sample(same, tok, tpl, drop_identical=True)
    assert res.sample is None and res.drop_reason == IDENTICAL
    rec = parse_record({"id": "x", "document": "d", "turns": [
        {"short_context": "s", "instruction": "q", "chosen": "A.", "rejected": "A."},
        {"short_context": "s", "instruction": "q2", "chosen": "B.", "rejected": "C."}]}, "f:1")
    res = build_sample(rec, tok, tpl, drop_identical=True)
    assert not res.identical and res.identical_turns == 1 and res.sample is not None


def test_truncating_a_plain_pair_prompt_keeps_its_end(tok):
    prompt = random_text(300, seed=5) + "\n\nWhat is the answer?"
    rec = parse_record({"id": "p", "prompt": prompt, "chosen": "It is 42.", "rejected": "No idea."}, "f:1")
    tpl = get_template("mistral", tok)
    full = build_sample(rec, tok, tpl).sample
    res = build_sample(rec, tok, tpl, max_seq_length=full.two_sequences_length - 100, overlong="truncate_document")
    s = res.sample
    assert res.truncated_tokens == 100 and len(s.chosen) == len(full.chosen) - 100
    assert tok.decode(s.chosen).endswith("\n\nWhat is the answer? [/INST]It is 42.</s>")
    assert tok.decode(s.chosen).startswith("<s>[INST] " + prompt[:40])
    assert mask_runs(s.rejected, s.rejected_mask) == [enc(tok, "No idea.") + [tok.eos_id]]


def test_authors_intermediate_json_gives_the_longpo_record_ids(tok):
    """prompt / short_prompt / question -> user = prompt + "\n\n" + question, as the authors build it."""
    official = parse_record({"prompt_id": "d1", "prompt": "Doc text.\nMore.", "short_prompt": "More.",
                             "question": "What follows?", "chosen": "More.", "rejected": "Nothing."}, "f:1")
    same = parse_record({"id": "d1", "document": "Doc text.\nMore.", "turns": [
        {"short_context": "More.", "instruction": "What follows?", "chosen": "More.", "rejected": "Nothing."}]}, "f:2")
    tpl = get_template("mistral", tok)
    a, b = build_sample(official, tok, tpl).sample, build_sample(same, tok, tpl).sample
    for x, y in ((a.chosen, b.chosen), (a.rejected, b.rejected), (a.references[0].chosen, b.references[0].chosen),
                 (a.references[0].rejected, b.references[0].rejected), (a.chosen_mask, b.chosen_mask)):
        assert x.tolist() == y.tolist()
    assert tok.decode(a.chosen) == "<s>[INST] Doc text.\nMore.\n\nWhat follows? [/INST]More.</s>"
    assert tok.decode(a.references[0].rejected) == "<s>[INST] More.\n\nWhat follows? [/INST]Nothing.</s>"


def test_sentencepiece_model_tokenizes_the_whole_rendered_text(dummy_prefix_tok):
    """A bare .model file: sentencepiece's own encoding of the rendered text, split only at the
    control tokens (<s>, </s>) that it cannot read from text."""
    t = dummy_prefix_tok
    rec = longpo(system="Sys.")
    d, tu = rec.document, rec.turns
    s = build_sample(rec, t, get_template("chatml", t)).sample
    text = ("<|im_start|>system\nSys.<|im_end|>\n"
            f"<|im_start|>user\n{d}\n\n{tu[0].instruction}<|im_end|>\n<|im_start|>assistant\n{tu[0].chosen}<|im_end|>\n"
            f"<|im_start|>user\n{tu[1].instruction}<|im_end|>\n<|im_start|>assistant\n{tu[1].chosen}<|im_end|>\n")
    assert s.chosen.tolist() == t._sp.encode(text)
    s = build_sample(rec, t, get_template("mistral", t)).sample
    segs = [f"[INST] Sys.\n\n{d}\n\n{tu[0].instruction} [/INST]{tu[0].chosen}", f"[INST] {tu[1].instruction} [/INST]{tu[1].chosen}"]
    assert s.chosen.tolist() == [t.bos_id] + t._sp.encode(segs[0]) + [t.eos_id] + t._sp.encode(segs[1]) + [t.eos_id]


@pytest.mark.parametrize("which", ["tok", "dummy_prefix_tok"])
def test_sentencepiece_offsets_from_ids_equal_its_protos(which, request):
    """The fast offset path (surface lengths per id) gives sentencepiece's own offsets."""
    t = request.getfixturevalue(which)
    assert t._surface_bytes is not None
    texts = [random_text(300, seed=2), "  lead space", "Ünïcödé — café 東京 naïve ✓ 🙂 «q» ½\n\n x",
             "[INST] a [/INST]b<|im_end|>\n", " ", "a  b   c\t\td"]
    for text in texts:
        fast = t.encode_with_offsets(text)
        table, t._surface_bytes = t._surface_bytes, None
        try:
            slow = t.encode_with_offsets(text)
        finally:
            t._surface_bytes = table
        for a, b in zip(fast, slow):
            assert a.tolist() == b.tolist(), text


def test_truncating_a_pair_keeps_its_short_prompts_context(tok):
    chunk = "Section 9: Bridges\nThe north bridge was rebuilt in 1911 for 3000 pounds."
    q = "\n\nWhen was the north bridge rebuilt?"
    prompt = random_text(200, seed=6) + "\n" + chunk + "\n" + random_text(200, seed=7) + q
    tpl = get_template("mistral", tok)
    rec = parse_record({"id": "p", "prompt": prompt, "chosen": "In 1911.", "rejected": "No idea.",
                        "short_prompt": chunk + q}, "f:1")
    L = build_sample(rec, tok, tpl).sample.two_sequences_length
    s = build_sample(rec, tok, tpl, max_seq_length=L - 300, overlong="truncate_document").sample
    assert s.two_sequences_length == L - 300 and chunk + "\n" in tok.decode(s.chosen)
    lost = parse_record({"id": "p", "prompt": prompt, "chosen": "In 1911.", "rejected": "No idea.",
                         "short_prompt": "Another chunk about the harbour." + q}, "f:2")
    res = build_sample(lost, tok, tpl, max_seq_length=L - 300, overlong="truncate_document")
    assert res.sample is None and res.drop_reason == OVERLONG_UNGROUNDED
