"""The CPU self-evolution loop (examples/self_evolution/run.py --quick): every stage runs through
the project's real tools (generation, preprocessing, both reference caches, three trainings,
evaluation) and the outputs fit together. The full run's numbers are in docs/self_evolution.md.

Independent checks on the outputs: the toy tokenizer gives the evaluation's piecewise token ids
for the text HF's own chat template renders; every pair's question is answerable from its chunk
(the key occurs once in the document, inside the chunk) and the chunk is a span of the document;
the summary equals the evaluation JSON; each method logged its own metrics.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    out = tmp_path_factory.mktemp("self_evolution")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "examples/self_evolution/run.py", "--quick", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, f"--- stdout\n{p.stdout[-5000:]}\n--- stderr\n{p.stderr[-5000:]}"
    return out, p.stdout


def test_summary_matches_evaluation(loop):
    out, stdout = loop
    summary = json.loads((out / "summary.json").read_text())
    doc = json.loads((out / "eval.json").read_text())
    assert (summary["short_length"], summary["long_length"]) == (128, 1024)
    labels = [c["label"] for c in doc["checkpoints"]]
    assert labels == ["base", "longpo", "sft", "dpo"]
    for c in doc["checkpoints"]:
        cells = c["results"]["kv_recall"]
        assert summary[c["label"]]["short"] == cells["128"]["accuracy"]
        assert summary[c["label"]]["long"] == cells["1024"]["accuracy"]
        assert 0.0 <= summary[c["label"]]["short"] <= 1.0 and 0.0 <= summary[c["label"]]["long"] <= 1.0
    # the table printed at the end holds the same numbers
    for label in labels:
        s, lg = summary[label]["short"], summary[label]["long"]
        assert f"| {label} | {100 * s:.1f}% | {100 * lg:.1f}% |" in stdout


def test_pairs_are_answerable_from_their_chunk(loop):
    out, _ = loop
    recs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert recs, "generation kept no record"
    n = 0
    for r in recs:
        for t in r["turns"]:
            key = re.fullmatch(r"What is the value of key (\S+)\?", t["instruction"]).group(1)
            assert t["short_context"] in r["document"]
            assert len(re.findall(rf"(?:^|\n)key {key} \w+\.", r["document"])) == 1
            assert len(re.findall(rf"(?:^|\n)key {key} \w+\.", t["short_context"])) == 1
            n += 1
    assert json.loads((out / "summary.json").read_text())["data"]["pairs"] == n


def test_toy_tokenizer_agrees_with_hf_chat_template(loop):
    """The evaluation tokenizes prompt pieces one by one; HF renders and tokenizes the whole
    conversation. With the toy tokenizer (newlines split before BPE) the ids are identical."""
    out, _ = loop
    sys.path.insert(0, str(ROOT / "examples" / "self_evolution"))
    import toy
    from megatron_longpo.evaluation.prompts import make_sample

    samples = toy.TrainingSamples(out / "tokenizer", 48, 128)
    hf = transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    for seed in range(5):
        for length in (128, 1024):
            s = make_sample(toy.TASK, length, seed, samples.template, samples.counter, samples.haystack)
            inst = s.instance
            msgs = [{"role": "user", "content": inst.intro + "".join(inst.context) + inst.question},
                    {"role": "assistant", "content": inst.answer_prefix + inst.answer + "."}]
            ids = hf.apply_chat_template(msgs, tokenize=True, return_dict=False)
            ids = np.asarray(ids["input_ids"] if isinstance(ids, dict) else ids)
            assert np.array_equal(ids[: len(s.tokens)], s.tokens), (seed, length)
            assert hf.decode(s.answer_tokens.tolist()) == inst.answer


def test_each_method_logged_its_metrics(loop):
    out, _ = loop
    for method in ("longpo", "sft", "dpo"):
        lines = [json.loads(x) for x in (out / method / "metrics.jsonl").read_text().splitlines()]
        train = [x for x in lines if x["split"] == "train"]
        evals = [x for x in lines if x["split"] == "eval"]
        assert [x["step"] for x in train] == [1, 2]
        assert [x["step"] for x in evals] == [1, 2]
        assert all("kv_recall/len1024/accuracy" in x for x in evals)
        assert ("logps/ref_chosen" in train[0]) == (method != "sft")
        meta = json.loads((out / method / "ckpt" / "iter_0000002" / "longpo_meta.json").read_text())
        assert (meta["iteration"], meta["model"]["rope_theta"]) == (2, 100000.0)  # the policy's raised base
    if (out / "accuracy_vs_step.png").exists() or (out / "accuracy_vs_length.png").exists():
        assert (out / "accuracy_vs_step.png").stat().st_size > 0
