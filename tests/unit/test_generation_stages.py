"""Generation stages without a model: filters, question parsing, chunking, pool, prompts, sharding,
journal repair, and the vllm / openai argument mapping."""

from __future__ import annotations

import json
import random

import pytest

from megatron_longpo.config import ConfigError
from megatron_longpo.generation import filters as F
from megatron_longpo.generation.answers import ANSWER_SAMPLING, Sampling
from megatron_longpo.generation.backends import (GenRequest, OpenAIConfig, VLLMConfig, openai_body, set_rope_theta,
                                                 vllm_engine_kwargs, vllm_sampling_kwargs)
from megatron_longpo.generation.chunking import chunk_document, paragraph_spans
from megatron_longpo.generation.driver import read_journal, shard_from_env
from megatron_longpo.generation.prompts import load_prompts
from megatron_longpo.generation.questions import (QuestionParseError, load_question_pool, parse_questions,
                                                  with_prefix)

PROMPTS = load_prompts()
CFG = F.FilterConfig(refusal_phrases=PROMPTS.refusal_phrases)


# -- filters ------------------------------------------------------------------------------------

GOOD = "The harbor council approved the bridge because the river flooded twice in the spring season."


@pytest.mark.parametrize("chosen,rejected,reason", [
    (GOOD, GOOD, None),
    ("", GOOD, F.EMPTY),
    (GOOD, "   \n ", F.EMPTY),
    ("I'm sorry, but the text does not say.", GOOD, F.REFUSAL),
    (GOOD, "As an AI language model I cannot read that.", F.REFUSAL),
    (GOOD, "I\u2019m sorry, the passage is unclear.", F.REFUSAL),  # typographic apostrophe
    ("Unfortunately, it is NOT MENTIONED IN the passage.", GOOD, F.REFUSAL),  # case-insensitive
    ("the the the the the the the the the the the the the the the the the the the the bridge", GOOD, F.REPETITION),
    ("42 17 9 !!", GOOD, F.TOO_FEW_WORDS),
    ("Yes.", GOOD, F.TOO_FEW_WORDS),  # one word of 3+ letters
])
def test_filters_on_crafted_answers(chosen, rejected, reason):
    assert F.check_pair(chosen, rejected, CFG) == reason


def test_repetition_thresholds_differ_for_chosen_and_rejected():
    # 1 - distinct/total = 1 - 2/21 = 0.905: above the chosen limit 0.9, below the rejected limit 0.95
    text = " ".join(["river"] * 20 + ["bridge"])
    assert F.repeated_word_ratio(text) == pytest.approx(1 - 2 / 21)
    assert F.check_pair(text, GOOD, CFG) == F.REPETITION
    assert F.check_pair(GOOD, text, CFG) is None
    assert F.repeated_word_ratio("") == 0.0 and F.content_words("a an of 123 river") == 1


def test_bundled_prompts_file():
    assert PROMPTS.num_questions == 4 and len(PROMPTS.question_prefixes) == 20
    assert len(PROMPTS.refusal_phrases) >= 35
    assert "CHUNK-TEXT" in PROMPTS.question_request("CHUNK-TEXT")


def test_prompts_file_errors(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("question_prompt: 'no placeholder'\nnum_questions: 4\nquestion_prefixes: []\nrefusal_phrases: []\n")
    with pytest.raises(ConfigError, match=r"\{context\}"):
        load_prompts(p)
    p.write_text("question_prompt: '{context} {oops}'\nnum_questions: 4\nquestion_prefixes: []\nrefusal_phrases: []\n")
    with pytest.raises(ConfigError, match="bad placeholder"):
        load_prompts(p)
    p.write_text("question_prompt: '{context}'\nnum_questions: 4\nquestion_prefixes: []\nrefusal_phrases: []\nextra: 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_prompts(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "missing.yaml")


# -- question parsing -----------------------------------------------------------------------------

def test_parse_questions_accepts_common_list_styles():
    text = ("Here are four questions about the text:\n\n1. What is the role of the council?\n"
            "2) How does the river\n   shape the harbor?\n**3.** Why was the bridge built?\nQuestion 4: Who wrote it?\n")
    assert parse_questions(text, 4) == [
        "What is the role of the council?", "How does the river shape the harbor?",
        "Why was the bridge built?", "Who wrote it?"]


@pytest.mark.parametrize("text,match", [
    ("", "no numbered items"),
    ("Sure! The text is about rivers.", "no numbered items"),
    ("1. A?\n2. B?\n3. C?", "3 items, expected 4"),
    ("1. A?\n2. B?\n3. C?\n4. D?\n5. E?", "5 items"),
    ("1. A?\n3. B?\n4. C?\n5. D?", "numbered"),
    ("1. A?\n2. B?\n2. C?\n4. D?", "numbered"),
    ("1. A?\n2.\n3. C?\n4. D?", "item 2 is empty"),
    ("2. A?\n3. B?\n4. C?\n5. D?", "numbered"),
])
def test_parse_questions_rejects_malformed_output(text, match):
    with pytest.raises(QuestionParseError, match=match):
        parse_questions(text, 4)


def test_prefix_is_one_of_the_phrases_and_deterministic():
    q1 = with_prefix("What is the code?", PROMPTS.question_prefixes, random.Random(3))
    q2 = with_prefix("What is the code?", PROMPTS.question_prefixes, random.Random(3))
    assert q1 == q2 and q1.endswith("what is the code?")
    assert any(q1.startswith(p) for p in PROMPTS.question_prefixes)
    assert with_prefix("NASA launched?", ["Given the text,"], random.Random(0)) == "Given the text, NASA launched?"


# -- question pool --------------------------------------------------------------------------------

def test_question_pool_lookup_and_errors(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question": "G?"}\n\n{"document_id": "d1", "question": "D1?"}\n'
                 '{"document_id": 7, "question": "K?", "chunk_index": 2}\n')
    pool = load_question_pool(p)
    assert {q.text for q in pool.candidates("d1", 0)} == {"G?", "D1?"}
    assert {q.text for q in pool.candidates("7", 2)} == {"G?", "K?"}
    assert {q.text for q in pool.candidates("7", 1)} == {"G?"}
    assert pool.chunk_indices("7") is None  # the global question serves any chunk

    p.write_text('{"document_id": "a", "question": "X?", "chunk_index": 1}\n')
    pool = load_question_pool(p)
    assert pool.chunk_indices("a") == {1} and pool.candidates("b", 0) == []
    assert pool.draw("a", 1, random.Random(0), set()) == "X?" and pool.draw("a", 0, random.Random(0), set()) is None

    p.write_text('{"question": "ok"}\nnot json\n{"question": ""}\n{"q": "x"}\n{"question": "x", "chunk_index": 1}\n')
    with pytest.raises(ConfigError) as e:
        load_question_pool(p)
    msg = str(e.value)
    assert "4 bad line(s)" in msg and f"{p}:2: malformed JSON" in msg and f"{p}:3: field 'question'" in msg
    assert f"{p}:4: unknown key" in msg and f"{p}:5: 'chunk_index' needs a 'document_id'" in msg


# -- chunking -------------------------------------------------------------------------------------

def _words(texts):
    return [len(t.split()) for t in texts]


def test_chunks_are_paragraph_aligned_substrings_within_bounds():
    rng = random.Random(0)
    paras = [" ".join("w%d" % rng.randint(0, 99) for _ in range(rng.randint(1, 40))) for _ in range(60)]
    paras[17] = " ".join(["long"] * 120)  # longer than the maximum alone: never inside a chunk
    doc = "\n\n".join(paras) + "\n"
    chunks = chunk_document(doc, _words, 30, 80)
    assert chunks
    starts = {a for a, _ in paragraph_spans(doc)}
    ends = {b for _, b in paragraph_spans(doc)}
    prev_end = -1
    for k, c in enumerate(chunks):
        text = doc[c.start:c.end]
        assert c.index == k and c.start in starts and c.end in ends and c.start >= prev_end
        assert "long long" not in text
        n_paras = len(text.split("\n\n"))
        assert c.num_tokens == len(text.split()) + n_paras - 1  # paragraph tokens + one per break
        assert 30 <= c.num_tokens <= 80
        prev_end = c.end
    # greedy: a chunk could not have taken the next paragraph without exceeding the maximum
    for c, nxt in zip(chunks, chunks[1:]):
        between = doc[c.end:nxt.start].strip()
        if not between:
            first_next = doc[nxt.start:nxt.end].split("\n\n")[0]
            assert c.num_tokens + 1 + len(first_next.split()) > 80


def test_latex_documents_split_at_sections():
    doc = "\\documentclass{article}\n\\section{Intro}\na b c\n\n d e\n\\section{Method} f g h i\n\\section*{End} j"
    spans = paragraph_spans(doc)
    assert [doc[a:b].split("}")[0] for a, b in spans] == ["\\documentclass{article", "\\section{Intro", "\\section{Method", "\\section*{End"]
    assert chunk_document("", _words, 1, 5) == []
    with pytest.raises(ValueError):
        chunk_document(doc, _words, 10, 5)


# -- sharding / journal ---------------------------------------------------------------------------

def test_shard_from_flags_and_slurm_env():
    assert shard_from_env(None, None, {}).name == "shard-00000-of-00001"
    assert (shard_from_env(4, 3, {}).num_shards, shard_from_env(4, 3, {}).shard_index) == (4, 3)
    s = shard_from_env(None, None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0"})
    assert (s.num_shards, s.shard_index) == (8, 5)
    s = shard_from_env(None, None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1"})
    assert (s.num_shards, s.shard_index) == (2, 0)
    assert shard_from_env(2, 1, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}).shard_index == 1  # flags win
    with pytest.raises(ConfigError, match="--shard-index"):
        shard_from_env(2, None, {})
    with pytest.raises(ConfigError, match="need 0 <= index"):
        shard_from_env(2, 2, {})
    assert [i for i in range(7) if shard_from_env(3, 1, {}).owns(i)] == [1, 4]


def test_journal_torn_tail_is_cut_and_complete_lines_kept(tmp_path):
    p = tmp_path / "j.partial"
    lines = [json.dumps({"doc_index": i}) for i in range(3)]
    p.write_text("\n".join(lines) + "\n" + '{"doc_index": 3, "rec')
    assert [e["doc_index"] for e in read_journal(p, repair=True)] == [0, 1, 2]
    assert p.read_text() == "\n".join(lines) + "\n"
    p.write_text(lines[0] + "\n" + "garbage\n" + lines[1] + "\n")
    with pytest.raises(ConfigError, match="line 2 is corrupt"):
        read_journal(p, repair=True)


# -- backend argument mapping ---------------------------------------------------------------------

def _req(long=False, sampling=ANSWER_SAMPLING):
    return GenRequest([{"role": "user", "content": "hi"}], [1, 2, 3], sampling, 1234, long)


def test_vllm_engine_and_sampling_arguments():
    cfg = VLLMConfig(tensor_parallel_size=8, max_model_len=131072 + 2048, gpu_memory_utilization=0.85, seed=3)
    v4 = {"rope_theta": 1e6, "max_position_embeddings": 32768}
    kw = vllm_engine_kwargs("/m", "/t", cfg, v4, None)
    assert kw["tensor_parallel_size"] == 8 and kw["max_model_len"] == 133120 and kw["enable_prefix_caching"]
    assert kw["model"] == "/m" and kw["tokenizer"] == "/t" and kw["seed"] == 3 and kw["gpu_memory_utilization"] == 0.85
    assert kw["hf_overrides"] == {"max_position_embeddings": 133120}
    kw = vllm_engine_kwargs("/m", "/t", cfg, v4, 1e7)
    assert kw["hf_overrides"] == {"rope_theta": 1e7, "max_position_embeddings": 133120}
    v5 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "max_position_embeddings": 10 ** 6}
    kw = vllm_engine_kwargs("/m", "/t", cfg, v5, 1e7)
    assert kw["hf_overrides"] == {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e7, "factor": 8.0}}
    assert "hf_overrides" not in vllm_engine_kwargs("/m", "/t", VLLMConfig(), v4, None)
    s = vllm_sampling_kwargs(_req(sampling=Sampling(0.7, 0.9, 1024)))
    assert s == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 1024, "seed": 1234, "skip_special_tokens": True}
    assert vllm_sampling_kwargs(_req(sampling=Sampling(0.0, 1.0, 5)))["temperature"] == 0.0


def test_openai_request_bodies_and_rope_override():
    r = _req()
    b = openai_body(OpenAIConfig("http://127.0.0.1:1/v1", "m"), r)
    assert b["prompt"] == [1, 2, 3] and b["max_tokens"] == 1024 and b["seed"] == 1234 and "messages" not in b
    b = openai_body(OpenAIConfig("http://127.0.0.1:1/v1", "m", api="chat"), r)
    assert b["messages"] == r.messages and "prompt" not in b

    class C:  # transformers 4.x and 5.x config layouts
        pass
    c4, c5 = C(), C()
    c4.rope_theta = 1e4
    c5.rope_parameters = {"rope_type": "default", "rope_theta": 1e4}
    set_rope_theta(c4, 1e7)
    set_rope_theta(c5, 1e7)
    assert c4.rope_theta == 1e7 and c5.rope_parameters == {"rope_type": "default", "rope_theta": 1e7}


# -- documents ------------------------------------------------------------------------------------

def test_documents_from_text_and_jsonl_in_order_with_checked_ids(tmp_path):
    from megatron_longpo.generation.documents import iter_documents

    (tmp_path / "book.txt").write_text("Para one.\n\nPara two.")
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "x"}\n\n{"text": "y", "id": 5}\n{"text": "z"}\n')
    docs = list(iter_documents([tmp_path / "book.txt", tmp_path / "d.jsonl"]))
    assert [(d.index, d.id, d.text) for d in docs] == [
        (0, "book", "Para one.\n\nPara two."), (1, "a", "x"), (2, "5", "y"), (3, "d:4", "z")]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    (tmp_path / "e.jsonl").write_text('{"text": "p"}\n{"text": "q", "id": "e:1"}\n')
    with pytest.raises(ConfigError, match="duplicate document id 'e:1'"):
        list(iter_documents([tmp_path / "e.jsonl"]))
    with pytest.raises(ConfigError, match="does not exist"):
        list(iter_documents([tmp_path / "missing.txt"]))
