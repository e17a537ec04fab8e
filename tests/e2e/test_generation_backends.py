"""The openai backend against a real OpenAI-compatible server on 127.0.0.1 (wrapping the hf backend),
retries included; the hf backend's long-context RoPE base."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_longpo.generation.answers import Sampling
from megatron_longpo.generation.backends import (ChatFormatter, GenerationError, GenRequest, HFBackend, OpenAIBackend,
                                                 OpenAIConfig, VLLMConfig, vllm_engine_kwargs)
from megatron_longpo.generation.cli import main as generate_main
from megatron_longpo.testing.generation import CompletionServer, build_tiny_chat_model, write_documents_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("backends")
    model = build_tiny_chat_model(d / "model")
    fmt = ChatFormatter(model)
    return d, model, fmt, HFBackend(model, fmt)


def _requests(fmt, n=4):
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Context: the harbor code is {1000 + i}.\n\nWhat is the code?"}]
        out.append(GenRequest(msgs, fmt.prompt_ids(msgs), Sampling(1.0, 0.9 if i % 2 else 1.0, 5), 100 + i))
    return out


def _cli_args(tmp_path, model, n_docs: int, seed: int, *extra: str) -> list[str]:
    """Generation options for tiny documents with a question pool and permissive filters."""
    docs = write_documents_jsonl(tmp_path / "docs.jsonl", n_docs, paragraphs=(4, 5), words=(3, 5), seed=seed)
    pool = tmp_path / "q.jsonl"
    pool.write_text('{"question": "What is the code of the harbor?"}\n')
    return ["--input", str(docs), "--model", str(model), "--questions", str(pool), "--chunk-min-tokens", "60",
            "--chunk-max-tokens", "200", "--max-new-tokens", "4", "--min-content-words", "0",
            "--max-repeat-ratio-chosen", "1", "--max-repeat-ratio-rejected", "1", "--no-progress", *extra]


def test_openai_backend_matches_hf_and_retries(tiny):
    d, model, fmt, hf = tiny
    reqs = _requests(fmt)
    expected = hf.generate(reqs)
    sleeps = []
    with CompletionServer(hf, fmt, faults=["drop", "503", None, "drop"]) as srv:
        cfg = OpenAIConfig(srv.url, "tiny", api_key="secret", max_retries=3, backoff_s=0.01, concurrency=1)
        backend = OpenAIBackend(cfg, sleep=sleeps.append)
        got = backend.generate(reqs)
    assert got == expected  # same text, token count and stop flag as the hf backend itself
    assert backend.retries == 3 and sleeps == [0.01, 0.02, 0.01]  # exponential backoff per request
    assert len(srv.calls) == len(reqs) + 3 and all(c["auth"] == "Bearer secret" for c in srv.calls)
    assert all(c["path"] == "/v1/completions" and c["model"] == "tiny" for c in srv.calls)

    with CompletionServer(hf, fmt) as srv:  # chat API: the server renders the same chat template
        chat = OpenAIBackend(OpenAIConfig(srv.url, "tiny", api="chat", concurrency=3))
        assert chat.generate(reqs) == expected
        assert all(c["path"] == "/v1/chat/completions" for c in srv.calls)

    with CompletionServer(hf, fmt, faults=["drop"] * 10) as srv:
        gone = OpenAIBackend(OpenAIConfig(srv.url, "tiny", max_retries=2, backoff_s=0.0))
        with pytest.raises(GenerationError, match="failed after 2 retries"):
            gone.generate(reqs[:1])


def test_cli_with_openai_backend_equals_hf_backend(tiny, tmp_path, monkeypatch):
    d, model, fmt, hf = tiny
    common = _cli_args(tmp_path, model, 2, 4)
    assert generate_main([*common, "--output", str(tmp_path / "hf.jsonl")]) == 0
    with CompletionServer(hf, fmt, faults=["drop"]) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
        monkeypatch.setenv("OPENAI_MODEL", "tiny")
        rc = generate_main([*common, "--output", str(tmp_path / "oa.jsonl"), "--backend", "openai",
                            "--openai-base-url", srv.url, "--openai-model", "tiny", "--openai-concurrency", "2"])
    assert rc == 0
    hf_out = (tmp_path / "hf.jsonl").read_text()
    assert hf_out and (tmp_path / "oa.jsonl").read_text() == hf_out


def test_hf_backend_long_rope_theta(tmp_path):
    from megatron_longpo.testing.convert import build_tiny_hf

    model = build_tiny_hf(tmp_path / "m", "mistral")  # default RoPE (no scaling), base 1e6
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({
        **json.loads((tmp_path / "m" / "tokenizer_config.json").read_text()), "chat_template": "{{ messages[0]['content'] }}"}))
    be = HFBackend(model, ChatFormatter(model), long_rope_theta=1e7)
    head_dim = 64 // 8
    ref = lambda base: 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # noqa: E731
    short, long = be.model(False), be.model(True)
    torch.testing.assert_close(short.model.rotary_emb.inv_freq.double(), ref(1e6))
    torch.testing.assert_close(long.model.rotary_emb.inv_freq.double(), ref(1e7))
    assert be.model(True) is long  # loaded once


def test_openai_long_rope_theta_needs_a_second_endpoint(tiny, tmp_path, capsys):
    """--backend openai --long-rope-theta only printed a note, so chosen answers were generated at the
    enlarged RoPE base too. Now: refused without --long-base-url; with it, questions and chosen
    answers go to the server at the model's own base and the rejected ones to the long-RoPE server,
    giving exactly the hf backend's records."""
    d, model, fmt, hf = tiny
    common = _cli_args(tmp_path, model, 2, 4, "--long-rope-theta", "1e6")
    oa = ["--backend", "openai", "--openai-model", "tiny", "--openai-base-url", "http://127.0.0.1:9/v1"]
    assert generate_main([*common, *oa, "--output", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--long-rope-theta needs --long-base-url" in err and "rope_theta" in err
    assert not (tmp_path / "x.jsonl.shards").exists()
    assert generate_main([*common, "--long-base-url", "http://127.0.0.1:9/v1", "--output", str(tmp_path / "y.jsonl")]) == 2
    assert "--long-base-url is for --backend openai" in capsys.readouterr().err

    assert generate_main([*common, "--output", str(tmp_path / "hf.jsonl")]) == 0
    long_hf = HFBackend(model, fmt, long_rope_theta=1e6)
    with CompletionServer(hf, fmt) as short_srv, CompletionServer(long_hf, fmt, long=True) as long_srv:
        rc = generate_main([*common, "--output", str(tmp_path / "oa.jsonl"), "--backend", "openai",
                            "--openai-base-url", short_srv.url, "--long-base-url", long_srv.url,
                            "--openai-model", "tiny"])
    assert rc == 0
    hf_out = (tmp_path / "hf.jsonl").read_text()
    assert hf_out and (tmp_path / "oa.jsonl").read_text() == hf_out
    records = [json.loads(x) for x in hf_out.splitlines()]
    turns = sum(len(r["turns"]) for r in records)
    # the short server saw the chosen prompts (chunk + question), the long one the rejected (document + question)
    docs_text = {r["document"] for r in records}
    assert len(long_srv.calls) == turns and len(short_srv.calls) == turns
    assert all(any(fmt.decode(c["prompt"]).count(doc) for doc in docs_text) for c in long_srv.calls)
    assert not any(any(fmt.decode(c["prompt"]).count(doc) for doc in docs_text) for c in short_srv.calls)


STANDIN = Path(__file__).resolve().parents[2] / "megatron_longpo" / "testing" / "vllm_standin"


@pytest.fixture
def vllm_standin(monkeypatch, tmp_path):
    """The CPU stand-in enforcing vLLM's API, for this process and the phase processes it spawns."""
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / "vllm_events.jsonl"
    monkeypatch.setenv("VLLM_STANDIN_LOG", str(log))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    return log


def _events(log):
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_vllm_standin_enforces_the_api(tiny, vllm_standin):
    import vllm

    d, model, fmt, hf = tiny
    kw = vllm_engine_kwargs(str(model), str(model), VLLMConfig(max_model_len=64), {"max_position_embeddings": 32}, 1e6)
    llm = vllm.LLM(**kw)  # every argument the backend passes exists in vLLM's LLM / EngineArgs
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_new_tokens'"):
        vllm.LLM(str(model), max_new_tokens=4)
    with pytest.raises(ValueError, match="greater than the derived max_model_len"):
        vllm.LLM(str(model), max_model_len=10 ** 7)
    with pytest.raises(TypeError, match="unexpected field"):
        vllm.SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p must be in"):
        vllm.SamplingParams(top_p=0.0)
    out = llm.generate([{"prompt_token_ids": [1, 5, 7]}], [vllm.SamplingParams(max_tokens=3, seed=1)], use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) <= 3 and isinstance(out[0].outputs[0].text, str)


def test_vllm_phases_run_in_their_own_processes_and_resume_exactly(tiny, tmp_path, vllm_standin, capfd):
    """The vllm backend swapped two engines per batch in one process (vLLM does not reliably free
    GPU memory). Now every chosen answer comes from one engine process at the model's own RoPE base,
    then every rejected answer from another at --long-rope-theta; records equal the hf backend's,
    and a rerun resumes each phase from its journal."""
    d, model, fmt, hf = tiny
    common = _cli_args(tmp_path, model, 3, 6, "--long-rope-theta", "1e6", "--batch-documents", "2")
    assert generate_main([*common, "--output", str(tmp_path / "hf.jsonl")]) == 0
    out = tmp_path / "vllm.jsonl"
    assert generate_main([*common, "--output", str(out), "--backend", "vllm"]) == 0
    assert out.read_text() == (tmp_path / "hf.jsonl").read_text() != ""
    ev = _events(vllm_standin)
    inits = [e for e in ev if e["event"] == "init"]
    assert len(inits) == 2 and len({e["pid"] for e in inits}) == 2 and os.getpid() not in {e["pid"] for e in inits}
    short, long = inits
    assert "rope_theta" not in json.dumps(short["hf_overrides"]) and "1000000.0" in json.dumps(long["hf_overrides"])
    gens = [e["pid"] for e in ev if e["event"] == "generate"]
    assert gens == sorted(gens, key=lambda p: p != short["pid"])  # all short-engine calls before the long ones
    # Resume: the long phase killed after its first batch -> only the long-RoPE engine runs again.
    shards = tmp_path / "vllm.jsonl.shards"
    final = shards / "shard-00000-of-00001.jsonl"
    first = final.read_text().splitlines()[:2]
    final.unlink()
    (shards / "shard-00000-of-00001.summary.json").unlink()
    (shards / "shard-00000-of-00001.jsonl.partial").write_text("\n".join(first) + "\n")
    out.unlink()
    vllm_standin.unlink()
    assert generate_main([*common, "--output", str(out), "--backend", "vllm"]) == 0
    inits = [e for e in _events(vllm_standin) if e["event"] == "init"]
    assert len(inits) == 1 and "1000000.0" in json.dumps(inits[0]["hf_overrides"])
    assert out.read_text() == (tmp_path / "hf.jsonl").read_text()
    assert "resuming shard-00000-of-00001: 2 of 3 documents already done" in capfd.readouterr().err


@pytest.mark.parametrize("template", ["auto", "mistral"])
def test_one_chat_template_from_generation_to_training_by_token_ids(tiny, tmp_path, template, capsys):
    """Generation offered only chatml / a Jinja file while preprocessing picked its own template, so
    data generated in one format was trained in another. Now the prompt ids a backend received are,
    token for token, the ids the preprocessed (training) sequences have before their responses; the
    records name the template, and preprocessing with another one is refused."""
    from megatron_longpo.data.indexed import PreferenceDataset
    from megatron_longpo.data.preprocess import main as preprocess_main
    from megatron_longpo.data.templates import get_template
    from megatron_longpo.data.tokenizer import Tokenizer
    from megatron_longpo.generation.pipeline import request_seed

    d, model, fmt, hf = tiny
    docs = write_documents_jsonl(tmp_path / "docs.jsonl", 3, paragraphs=(4, 6), words=(3, 5), seed=9)
    pool = tmp_path / "q.jsonl"
    pool.write_text('{"question": "What is the code of the harbor?"}\n{"question": "Which section names a bridge?"}\n')
    out = tmp_path / "gen.jsonl"
    fmt_t = ChatFormatter(model, template)
    long_hf = HFBackend(model, fmt_t, long_rope_theta=1e6)
    with CompletionServer(HFBackend(model, fmt_t), fmt_t) as short_srv, \
            CompletionServer(long_hf, fmt_t, long=True) as long_srv:
        assert generate_main(["--input", str(docs), "--model", str(model), "--questions", str(pool),
                              "--chunk-min-tokens", "40", "--chunk-max-tokens", "120", "--max-new-tokens", "4",
                              "--min-content-words", "0", "--max-repeat-ratio-chosen", "1",
                              "--max-repeat-ratio-rejected", "1", "--no-progress", "--seed", "3", "--max-turns", "2",
                              "--chat-template", template, "--long-rope-theta", "1e6", "--backend", "openai",
                              "--openai-base-url", short_srv.url, "--long-base-url", long_srv.url,
                              "--openai-model", "tiny", "--output", str(out)]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    want = get_template(template, Tokenizer(model)).describe()
    assert records and all(r["meta"]["chat_template"] == want for r in records)
    assert want["name"] == ("tokenizer" if template == "auto" else template)
    prefix = str(tmp_path / "bin" / "train")
    assert preprocess_main(["--input", str(out), "--tokenizer", str(model), "--output-prefix", prefix,
                            "--chat-template", template, "--max-seq-length", "4096", "--no-progress"]) == 0
    ds = PreferenceDataset(prefix)  # what the trainer reads
    sent = {c["seed"]: c["prompt"] for c in short_srv.calls + long_srv.calls}
    checked = 0
    for i, r in enumerate(records):
        s = ds[i]
        assert s.id == r["id"] and s.num_turns == len(r["turns"])
        # the long (rejected) prompt of turn 0 == the policy sequence up to its first response token
        first = int(np.argmax(s.chosen_mask))
        assert s.chosen[:first].tolist() == sent[request_seed(3, r["id"], 0, "rejected")]
        for k, ref in enumerate(s.references):  # each chosen prompt == its reference turn before the response
            start = int(np.argmax(ref.chosen_mask))
            assert ref.chosen[:start].tolist() == sent[request_seed(3, r["id"], k, "chosen")]
            checked += 1
    assert checked >= len(records)
    other = "tokenizer" if template == "mistral" else "mistral"
    assert preprocess_main(["--input", str(out), "--tokenizer", str(model), "--output-prefix", str(tmp_path / "x"),
                            "--chat-template", other, "--max-seq-length", "4096", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"was generated with the chat template {want['name']!r}" in err and "nothing was written" in err
    assert not list(tmp_path.glob("x.*"))


def test_vllm_without_long_rope_is_one_engine_in_process(tiny, tmp_path, vllm_standin):
    d, model, fmt, hf = tiny
    common = _cli_args(tmp_path, model, 2, 8)
    assert generate_main([*common, "--output", str(tmp_path / "hf.jsonl")]) == 0
    assert generate_main([*common, "--output", str(tmp_path / "v.jsonl"), "--backend", "vllm"]) == 0
    assert (tmp_path / "v.jsonl").read_text() == (tmp_path / "hf.jsonl").read_text() != ""
    inits = [e for e in _events(vllm_standin) if e["event"] == "init"]
    assert [e["pid"] for e in inits] == [os.getpid()] and "rope" not in json.dumps(inits[0]["hf_overrides"])
