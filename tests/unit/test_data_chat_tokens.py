"""Built sequences equal the tokenizer's own chat-template tokenization, token for token, and the
response masks equal HF's return_assistant_tokens_mask ({% generation %} spans), for a Mistral-like
sentencepiece tokenizer with a dummy prefix (via LlamaTokenizerFast), a Llama-3-like byte-level
BPE and a Qwen2-like ChatML BPE, with the tokenizer's template and the built-in ones."""

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.data.schema import DataError, parse_record
from megatron_longpo.data.sequences import build_sample, generation_prompt_ids
from megatron_longpo.data.synthetic import (
    corpus,
    make_llama3_like_tokenizer,
    make_mistral_like_tokenizer,
    make_qwen2_like_tokenizer,
    make_qwen3_like_tokenizer,
)
from megatron_longpo.data.templates import ChatMessage, get_template
from megatron_longpo.data.tokenizer import Tokenizer

UNICODE = "Ünïcödé — café 東京 naïve ✓ 🙂 «quote» ½"

RECORDS = [
    {"id": "sys-2turn", "system": "You answer from the text. Café ✓.",
     "document": "Annual report of Ashford.\n\nSection 1: Water\nThe reservoir in 東京 holds 4200 cubic metres.\n\n"
                 "Section 2: Staff\nThe engineer Ada Novak (née Müller) was appointed in 1987.  Two spaces.",
     "turns": [
         {"short_context": "Section 2: Staff\nThe engineer Ada Novak (née Müller) was appointed in 1987.",
          "instruction": "As described in the preceding text, when was Ada Novak appointed?",
          "chosen": "Section 2 says 1987 — the année of her arrival. 🙂", "rejected": "Probably in 1990."},
         {"short_context": "Section 1: Water\nThe reservoir in 東京 holds 4200 cubic metres.",
          "instruction": "How much does the reservoir hold? Answer with «units».",
          "chosen": "It holds 4200 cubic metres.\n\nSee section 1.", "rejected": " The text does not say. "}]},
    {"id": "nosys-3turn", "document": UNICODE + "\n" + "word " * 40 + "\nend.",
     "turns": [{"short_context": UNICODE, "instruction": f"Q{i}: what is {UNICODE[:8]}?",
                "chosen": f"A{i}: naïve.", "rejected": f"B{i}: 東京 {i}."} for i in range(3)]},
    {"id": "pair-chat", "prompt": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Doc 東京 text.\n\nQuestion?"}],
     "chosen": "Yes, 東京.", "rejected": "No.",
     "short_prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Doc.\n\nQuestion?"}]},
]


def conversations(raw):
    """The messages the record stands for (independent of sequences.py)."""
    if "document" in raw:
        sys = [{"role": "system", "content": raw["system"]}] if raw.get("system") else []
        t = raw["turns"]
        out = {}
        for key in ("chosen", "rejected"):
            msgs = sys + [{"role": "user", "content": raw["document"] + "\n\n" + t[0]["instruction"]}]
            for i, turn in enumerate(t):
                if i:
                    msgs.append({"role": "user", "content": turn["instruction"]})
                msgs.append({"role": "assistant", "content": turn[key]})
            out[key] = msgs
        refs = [[sys + [{"role": "user", "content": turn["short_context"] + "\n\n" + turn["instruction"]},
                        {"role": "assistant", "content": turn[k]}] for k in ("chosen", "rejected")] for turn in t]
        return out, refs
    out = {k: raw["prompt"] + [{"role": "assistant", "content": raw[k]}] for k in ("chosen", "rejected")}
    refs = [[raw["short_prompt"] + [{"role": "assistant", "content": raw[k]}] for k in ("chosen", "rejected")]]
    return out, refs


def hf_reference(hf, msgs, responses_from=0):
    """Ids and assistant mask from HF; assistant messages before message ``responses_from`` are
    prompt history (a pair record's earlier turns), not responses."""
    r = hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = np.asarray(r["assistant_masks"])
    if responses_from:
        prompt = hf.apply_chat_template(msgs[:responses_from], tokenize=True, return_dict=True)["input_ids"]
        mask[: len(prompt)] = 0
    return np.asarray(r["input_ids"]), mask


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    texts = corpus() + [UNICODE, RECORDS[0]["document"]]
    root = tmp_path_factory.mktemp("chat_tokens")
    return {
        "mistral": Tokenizer(make_mistral_like_tokenizer(root / "mistral", texts)),
        "llama3": Tokenizer(make_llama3_like_tokenizer(root / "llama3", texts)),
        "qwen2": Tokenizer(make_qwen2_like_tokenizer(root / "qwen2", texts)),
        "mistral_sp": Tokenizer(root / "mistral" / "sp" / "tokenizer.model"),  # the raw .model file
    }


# (tokenizer, template, HF tokenizer that gives the reference, records)
CASES = [
    ("mistral", "tokenizer", "mistral", [0, 1, 2]),
    ("mistral", "mistral", "mistral", [0, 1, 2]),
    ("mistral_sp", "mistral", "mistral", [0, 1, 2]),
    ("llama3", "tokenizer", "llama3", [0, 1, 2]),
    ("qwen2", "tokenizer", "qwen2", [0, 1, 2]),
    ("qwen2", "chatml", "qwen2", [0, 2]),  # the built-in chatml has no default system prompt
]


@pytest.mark.parametrize("tok_name, template, ref_name, recs", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sequences_equal_apply_chat_template(toks, tok_name, template, ref_name, recs):
    tok, hf = toks[tok_name], toks[ref_name]._hf
    tpl = get_template(template, tok)
    assert tpl.name == template
    for k in recs:
        raw = RECORDS[k]
        s = build_sample(parse_record(raw, "t.jsonl:1"), tok, tpl).sample
        convs, refs = conversations(raw)
        for seq, mask, key in ((s.chosen, s.chosen_mask, "chosen"), (s.rejected, s.rejected_mask, "rejected")):
            ids, amask = hf_reference(hf, convs[key], len(raw["prompt"]) if "prompt" in raw else 0)
            assert seq.tolist() == ids.tolist(), (raw["id"], key)
            assert mask.tolist() == amask.tolist(), (raw["id"], key)
        assert len(s.references) == len(refs)
        for turn, (c_msgs, r_msgs) in zip(s.references, refs):
            for seq, mask, msgs in ((turn.chosen, turn.chosen_mask, c_msgs), (turn.rejected, turn.rejected_mask, r_msgs)):
                ids, amask = hf_reference(hf, msgs)
                assert seq.tolist() == ids.tolist() and mask.tolist() == amask.tolist(), raw["id"]


def test_dummy_prefix_boundaries_are_the_models(toks):
    """The piecewise defect: no extra "▁" after [INST], before \\n\\n or before [/INST]."""
    tok = toks["mistral"]
    raw = RECORDS[0]
    s = build_sample(parse_record(raw, "t.jsonl:1"), tok, get_template("mistral", tok)).sample
    msgs = conversations(raw)[0]["chosen"]
    assert len(s.chosen) == len(hf_reference(tok._hf, msgs)[0])
    pieces = ("[INST] ", msgs[0]["content"], "\n\n", msgs[1]["content"], " [/INST]")
    assert sum(len(tok.encode(p)) for p in pieces) > len(tok.encode("".join(pieces)))  # what was wrong


# --- the models' own template texts --------------------------------------------------------------
# TRL ships the original chat templates of public models as files (trl/chat_templates/*.jinja, the
# texts it compares tokenizer.chat_template against); tools/setup_env.sh installs trl==1.16.0
# --no-deps for them and the package is never imported. The hashes pin the texts tested here.
REAL_TEMPLATES = {
    "qwen3": "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",  # Qwen3 (thinking, <think>)
    "qwen3_instruct_2507": "64f85b198065d0fba2a81f37e10ed68161ce2c19a754c7100e67e0ca2ee9c326",
    "qwen2_5": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",  # default system prompt
}


def real_template(name: str) -> str:
    spec = importlib.util.find_spec("trl")
    assert spec is not None and spec.submodule_search_locations, (
        "trl is not installed: run `make setup` (tools/setup_env.sh installs trl==1.16.0 for its chat template files)")
    text = (Path(list(spec.submodule_search_locations)[0]) / "chat_templates" / f"{name}.jinja").read_text()
    assert hashlib.sha256(text.encode()).hexdigest() == REAL_TEMPLATES[name], f"trl's {name}.jinja changed"
    return text


@pytest.fixture(scope="module")
def real_toks(tmp_path_factory):
    texts = corpus() + [UNICODE, RECORDS[0]["document"], "<think>\n\n</think>\n\n"]
    root = tmp_path_factory.mktemp("real_templates")
    return {name: Tokenizer(make_qwen3_like_tokenizer(root / name, texts, real_template(name))) for name in REAL_TEMPLATES}


# A pair record whose answers start with newlines (Qwen3 strips them from the last answer) and spaces.
EDGE = {"id": "edge", "prompt": [{"role": "user", "content": "Doc text.\n\nQuestion?"},
                                 {"role": "assistant", "content": "\nEarlier answer.\n"},
                                 {"role": "user", "content": "\n Next question? "}],
        "chosen": "\n\nIt starts with newlines. ", "rejected": "  Spaces first.\n",
        "short_prompt": [{"role": "user", "content": "Doc.\n\nQuestion?"}]}


def offsets_mask(hf, msgs, responses_from):
    """Reference ids and response mask from the template's own rendering: HF tokenizes the rendered
    text; a token is a response token when it overlaps the text of an assistant message (from
    message ``responses_from`` on) as the template wrote it, or the <|im_end|> that closes it."""
    text = hf.apply_chat_template(msgs, tokenize=False)
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == hf.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    spans, pos = [], 0
    for i, m in enumerate(msgs):
        head = text.index(f"<|im_start|>{m['role']}\n", pos) + len(f"<|im_start|>{m['role']}\n")
        end = text.index("<|im_end|>", head)
        body = text[head:end]
        if m["role"] == "assistant" and body.startswith("<think>\n"):  # Qwen3's (empty) think block
            body = body.split("</think>\n\n", 1)[1]
        assert body in (m["content"], m["content"].lstrip("\n")), (body, m["content"])
        if m["role"] == "assistant" and i >= responses_from:
            spans.append((end - len(body), end + len("<|im_end|>")))
        pos = end
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return np.asarray(enc["input_ids"]), np.asarray(mask)


@pytest.mark.parametrize("name", list(REAL_TEMPLATES))
def test_sequences_equal_the_real_qwen_templates(real_toks, name):
    """Chosen, rejected and reference sequences of multi-turn records equal apply_chat_template
    with the model's original template text (Qwen3: the last answer carries the empty think block
    and loses its leading newlines; earlier answers do not)."""
    tok = real_toks[name]
    hf = tok._hf
    tpl = get_template("auto", tok)
    assert tpl.name == "tokenizer"
    for raw in (*RECORDS, EDGE):
        s = build_sample(parse_record(raw, "t.jsonl:1"), tok, tpl).sample
        convs, refs = conversations(raw)
        for seq, mask, key in ((s.chosen, s.chosen_mask, "chosen"), (s.rejected, s.rejected_mask, "rejected")):
            ids, amask = offsets_mask(hf, convs[key], len(raw["prompt"]) if "prompt" in raw else 0)
            assert seq.tolist() == ids.tolist(), (raw["id"], key)
            assert mask.tolist() == amask.tolist(), (raw["id"], key)
        for turn, (c_msgs, r_msgs) in zip(s.references, refs):
            for seq, mask, msgs in ((turn.chosen, turn.chosen_mask, c_msgs), (turn.rejected, turn.rejected_mask, r_msgs)):
                ids, amask = offsets_mask(hf, msgs, 0)
                assert seq.tolist() == ids.tolist() and mask.tolist() == amask.tolist(), raw["id"]
    if name == "qwen3":  # the think block is template text in front of the last answer, not response
        chosen = build_sample(parse_record(EDGE, "t.jsonl:1"), tok, tpl).sample
        think = tok.encode("<think>\n\n</think>\n\n").tolist()
        ids = chosen.chosen.tolist()
        at = next(i for i in range(len(ids)) if ids[i:i + len(think)] == think)
        assert not chosen.chosen_mask[at:at + len(think)].any() and chosen.chosen_mask[at + len(think)]


@pytest.mark.parametrize("name", list(REAL_TEMPLATES))
def test_generation_prompt_equals_enable_thinking_false(real_toks, name):
    """The prompt a model answers from (generation, evaluation) is apply_chat_template's generation
    prompt with enable_thinking=False (Qwen3: an empty think block; the others ignore the flag)."""
    tok = real_toks[name]
    tpl = get_template("auto", tok)
    for msgs in (EDGE["prompt"], [{"role": "system", "content": "Be brief."}, *EDGE["prompt"]],
                 [{"role": "user", "content": UNICODE}]):
        ours = generation_prompt_ids(tpl, tok, [ChatMessage(m["role"], (m["content"],)) for m in msgs])
        ref = tok._hf.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=True,
                                          return_dict=True)["input_ids"]
        assert ours.tolist() == ref, (name, msgs)


def test_content_the_template_rewrites_is_refused(real_toks):
    """Qwen3 moves text before '</think>' in an answer into a reasoning block: the record is refused
    naming it, instead of training on a mask that is off."""
    tok = real_toks["qwen3"]
    raw = {**EDGE, "chosen": "Plan.</think>The answer."}
    with pytest.raises(DataError, match=r"t\.jsonl:1: record 'edge'.*</think>"):
        build_sample(parse_record(raw, "t.jsonl:1"), tok, get_template("auto", tok))
