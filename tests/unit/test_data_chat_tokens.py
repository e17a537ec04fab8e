"""Built sequences equal the tokenizer's own chat-template tokenization, token for token, and the
response masks equal HF's return_assistant_tokens_mask ({% generation %} spans), for a Mistral-like
sentencepiece tokenizer with a dummy prefix (via LlamaTokenizerFast), a Llama-3-like byte-level
BPE and a Qwen2-like ChatML BPE, with the tokenizer's template and the built-in ones."""

import numpy as np
import pytest

from megatron_longpo.data.schema import parse_record
from megatron_longpo.data.sequences import build_sample
from megatron_longpo.data.synthetic import (
    corpus,
    make_llama3_like_tokenizer,
    make_mistral_like_tokenizer,
    make_qwen2_like_tokenizer,
)
from megatron_longpo.data.templates import get_template
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
