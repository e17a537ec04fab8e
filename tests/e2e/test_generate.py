"""tools/generate_longpo_data.py end to end with a tiny random Llama on CPU.

The random model writes gibberish, so these runs use a --questions pool and permissive answer
filters (the filters are tested on crafted answers in tests/unit/test_generation_stages.py and
through the pipeline with a scripted backend below).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_longpo.data.preprocess import main as preprocess_main
from megatron_longpo.generation.backends import ChatFormatter, GenResult
from megatron_longpo.generation.chunking import chunk_document
from megatron_longpo.generation.cli import main as generate_main
from megatron_longpo.generation.documents import iter_documents
from megatron_longpo.generation.filters import FilterConfig
from megatron_longpo.generation.pipeline import GenerationConfig, Pipeline
from megatron_longpo.generation.prompts import load_prompts
from megatron_longpo.generation.questions import load_question_pool
from megatron_longpo.testing.generation import build_tiny_chat_model, write_documents_jsonl

ROOT = Path(__file__).resolve().parents[2]
CHUNK_MIN, CHUNK_MAX = 80, 200
N_DOCS = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    model = build_tiny_chat_model(d / "model")
    docs = write_documents_jsonl(d / "docs.jsonl", N_DOCS - 1, paragraphs=(5, 8), words=(3, 6), seed=1)
    with open(docs, "a") as f:  # one document too short to hold a chunk
        f.write(json.dumps({"id": "tiny", "text": "Too short."}) + "\n")
    pool = d / "questions.jsonl"
    pool.write_text('{"question": "What is the code of the harbor?"}\n'
                    '{"question": "Which section mentions the bridge?"}\n'
                    '{"document_id": "doc-2", "question": "What does section 2 say?", "chunk_index": 1}\n')
    return d, model, docs, pool


def _args(env, out, *extra):
    d, model, docs, pool = env
    return ["--input", str(docs), "--output", str(out), "--model", str(model), "--questions", str(pool),
            "--chunk-min-tokens", str(CHUNK_MIN), "--chunk-max-tokens", str(CHUNK_MAX), "--max-new-tokens", "4",
            "--max-turns", "2", "--seed", "7", "--long-rope-theta", "1e6", "--min-content-words", "0",
            "--max-repeat-ratio-chosen", "1", "--max-repeat-ratio-rejected", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference_run(env):
    out = env[0] / "single" / "out.jsonl"
    assert generate_main(_args(env, out, "--batch-documents", "4")) == 0
    return out


def test_records_are_accepted_by_preprocess_and_short_contexts_are_chunks(env, reference_run, tmp_path):
    d, model, docs, pool = env
    records = [json.loads(x) for x in reference_run.read_text().splitlines()]
    assert len(records) == N_DOCS - 1
    fmt = ChatFormatter(model)
    by_id = {doc.id: doc.text for doc in iter_documents([docs])}
    for r in records:
        assert r["document"] == by_id[r["id"]] and 1 <= len(r["turns"]) <= 2
        chunks = {r["document"][c.start:c.end] for c in chunk_document(r["document"], fmt.count_tokens, CHUNK_MIN, CHUNK_MAX)}
        for t in r["turns"]:
            assert t["short_context"] in chunks and t["short_context"] in r["document"]
            assert any(t["instruction"].endswith(q) for q in ("what is the code of the harbor?",
                                                               "which section mentions the bridge?",
                                                               "what does section 2 say?"))
    # the chunk-bound question only ever lands on chunk 1 of doc-2
    summary = json.loads((reference_run.parent / "out.summary.json").read_text())
    assert summary["documents"] == {"read": N_DOCS, "written": N_DOCS - 1, "dropped": {"document_too_short": 1}}
    assert summary["turns"]["written"] == sum(len(r["turns"]) for r in records)
    assert summary["tokens"]["generated"] > 0

    rc = preprocess_main(["--input", str(reference_run), "--tokenizer", str(model), "--output-prefix",
                          str(tmp_path / "bin" / "ds"), "--max-seq-length", "100000", "--no-progress"])
    assert rc == 0
    meta = json.loads((tmp_path / "bin" / "ds.json").read_text())
    assert meta["counts"]["records_written"] == len(records) and meta["counts"]["longpo_records"] == len(records)
    assert meta["counts"]["records_without_short_context"] == 0


def test_two_shards_merged_equal_the_single_process_run(env, reference_run, capsys):
    out = env[0] / "sharded" / "out.jsonl"
    for i in (1, 0):  # order of completion must not matter
        assert generate_main(_args(env, out, "--num-shards", "2", "--shard-index", str(i), "--batch-documents", "1")) == 0
        assert not out.exists()
        if i == 1:
            assert generate_main(["--output", str(out), "--merge"]) == 2
            assert "1 of 2 shards are not finished: ['shard-00000-of-00002']" in capsys.readouterr().err
    assert generate_main(["--output", str(out), "--merge"]) == 0
    assert out.read_bytes() == reference_run.read_bytes()
    a = json.loads((out.parent / "out.summary.json").read_text())
    b = json.loads((reference_run.parent / "out.summary.json").read_text())
    for k in ("documents", "turns", "tokens"):
        assert a[k] == b[k]


def test_kill_mid_run_then_rerun_equals_uninterrupted(env, reference_run):
    out = env[0] / "killed" / "out.jsonl"
    partial = out.with_name("out.jsonl.shards") / "shard-00000-of-00001.jsonl.partial"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "generate_longpo_data.py"),
                             *_args(env, out, "--batch-documents", "1")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if partial.is_file() and partial.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = partial.read_text().count("\n")
    assert 2 <= done < N_DOCS and not out.exists()
    with open(partial, "a") as f:  # a write torn by the kill
        f.write('{"doc_index": 5, "doc_id": "tin')
    assert generate_main(_args(env, out, "--batch-documents", "4")) == 0
    assert out.read_bytes() == reference_run.read_bytes()
    final = partial.with_name("shard-00000-of-00001.jsonl")
    ids = [json.loads(x)["doc_index"] for x in final.read_text().splitlines()]
    assert sorted(ids) == list(range(N_DOCS))  # no duplicates


def test_rerun_of_finished_output_and_changed_options(env, reference_run, capsys):
    before = reference_run.read_bytes()
    assert generate_main(_args(env, reference_run)) == 0
    assert "is complete; nothing to do" in capsys.readouterr().err
    assert reference_run.read_bytes() == before
    assert generate_main(_args(env, reference_run, "--seed", "8")) == 2
    err = capsys.readouterr().err
    assert "different options" in err and "seed" in err
    # a nested option is named alone (config.max_turns), not by dumping both option dicts
    assert generate_main(_args(env, reference_run, "--max-turns", "3")) == 2
    err = capsys.readouterr().err
    assert "  config.max_turns: before 2, now 3\n" in err and "chunk_min_tokens" not in err, err
    assert reference_run.read_bytes() == before


def test_bad_inputs_fail_before_any_work(env, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    assert generate_main(_args(env, tmp_path / "o.jsonl")[:0] + ["--input", str(bad), "--output", str(tmp_path / "o.jsonl"),
                                                                  "--model", str(env[1])]) == 2
    assert f"{bad}:2: expected an object with a string field 'text'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl.shards").exists()
    assert generate_main(_args(env, tmp_path / "o.jsonl", "--chunk-min-tokens", "500", "--chunk-max-tokens", "100")) == 2
    assert "--chunk-min-tokens 500" in capsys.readouterr().err
    assert generate_main(["--output", str(tmp_path / "none.jsonl"), "--merge"]) == 2
    assert "run the shards first" in capsys.readouterr().err


class ScriptedBackend:
    """Answers chosen by the request: question lists by document, crafted answers by turn."""

    name = "scripted"
    model_seconds = 0.0

    def __init__(self, question_text, answers):
        self.question_text, self.answers, self.requests = question_text, answers, []

    def generate(self, requests):
        self.requests.extend(requests)
        out = []
        for r in requests:
            user = r.messages[-1]["content"]
            if user.startswith("Context:"):
                out.append(GenResult(self.question_text, 10, True))
            else:
                out.append(GenResult(self.answers("rejected" if r.long else "chosen", user), 5, True))
        return out

    def close(self):
        pass


def test_pipeline_counts_every_drop_with_model_written_questions(env):
    d, model, docs, pool = env
    fmt = ChatFormatter(model)
    prompts = load_prompts()
    documents = list(iter_documents([docs]))
    good = "The harbor code appears in the second section of the annual report."

    def answers(kind, user):
        if "bridge" in user.split("\n\n")[-1]:
            return "I'm sorry, I cannot answer that." if kind == "rejected" else good
        return good

    questions = "Here you go:\n1. What is the harbor code?\n2. Which section mentions the bridge?\n3. Who?\n4. Why?"
    cfg = GenerationConfig(seed=3, max_turns=2, chunk_min_tokens=CHUNK_MIN, chunk_max_tokens=CHUNK_MAX,
                           max_new_tokens=8, filters=FilterConfig())
    backend = ScriptedBackend(questions, answers)
    results = Pipeline(cfg, prompts, fmt, backend).run(documents)
    dropped = Counter(t for r in results for t in r.dropped_turns.elements())
    kept = [t for r in results if r.record for t in r.record["turns"]]
    attempted = sum(r.stats["turns_attempted"] for r in results)
    assert attempted == len(kept) + sum(dropped.values()) and attempted > 0
    assert set(dropped) <= {"refusal"}
    assert all(t["chosen"] == good and "bridge" not in t["instruction"] for t in kept)
    assert dropped["refusal"] == sum(1 for r in backend.requests if r.long and "bridge" in r.messages[-1]["content"].split("\n\n")[-1])
    # question requests carry the chunk, chosen the chunk + instruction, rejected the whole document
    q = [r for r in backend.requests if r.messages[-1]["content"].startswith("Context:")]
    assert len(q) == attempted and all(r.sampling.temperature == 0.7 and r.sampling.top_p == 0.9 for r in q)
    for r in results:
        if r.record:
            t = r.record["turns"][0]
            assert any(x.messages[-1]["content"] == r.doc.text + "\n\n" + t["instruction"] and x.long for x in backend.requests)
            assert any(x.messages[-1]["content"] == t["short_context"] + "\n\n" + t["instruction"] and not x.long
                       for x in backend.requests)
    assert [r.dropped_document for r in results].count("document_too_short") == 1

    # engine context limit: turns whose long prompt + max_new_tokens does not fit are dropped, exactly those
    pooled = ScriptedBackend(questions, answers)
    Pipeline(cfg, prompts, fmt, pooled, load_question_pool(pool)).run(documents)
    long_lens = [len(r.prompt_ids) for r in pooled.requests if r.long]
    limit = max(long_lens) - 1 + cfg.max_new_tokens
    results = Pipeline(replace(cfg, max_context_tokens=limit), prompts, fmt, ScriptedBackend(questions, answers),
                       load_question_pool(pool)).run(documents)
    assert sum(r.dropped_turns["answer_prompt_too_long"] for r in results) == long_lens.count(max(long_lens)) > 0

    backend = ScriptedBackend("1. Only one question?", answers)  # does not parse to 4 questions
    results = Pipeline(cfg, prompts, fmt, backend).run(documents)
    assert sum(r.dropped_turns["question_parse_failed"] for r in results) == attempted
    assert [r.dropped_document for r in results].count("all_turns_dropped") == N_DOCS - 1
    assert not any(r.long for r in backend.requests)  # nothing answered after failed questions


@pytest.mark.slow
def test_megatron_checkpoint_as_model_gives_the_same_records(env, reference_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(env[1]),
                        "--out", str(ckpt), "--dtype", "fp32", "--no-progress"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "from_ckpt.jsonl"
    args = _args(env, out, "--batch-documents", "4")
    args[args.index("--model") + 1] = str(ckpt)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "generate_longpo_data.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes() == reference_run.read_bytes()
