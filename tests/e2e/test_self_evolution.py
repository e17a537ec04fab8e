"""The CPU self-evolution loop (examples/self_evolution/run.py --quick): every stage runs through
the project's real tools (generation, preprocessing, both reference caches, the step-1
gradient-norm runs, four arms, evaluation with --rope-theta) and the outputs fit together. The
full run's numbers are in docs/self_evolution.md; this checks the pipeline's invariants, never
that one method wins.

Independent checks on the outputs: the toy tokenizer gives the evaluation's piecewise token ids
for the text HF's own chat template renders (both skills); every pair's question is answerable
from its chunk and never about the held-out skill; the four arms were trained on the same data
(identical configs but for the objective, identical step-1 policy log-probs); summary.json is
recomputed here from the evaluation's per-sample outputs, intervals included.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from megatron_longpo.evaluation.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
ARMS = ("longpo", "dpo", "sft", "sft_rejected")
ROWS = ("base", "base_policy_rope") + ARMS


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    out = tmp_path_factory.mktemp("self_evolution")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "examples/self_evolution/run.py", "--quick", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=2400)
    assert p.returncode == 0, f"--- stdout\n{p.stdout[-5000:]}\n--- stderr\n{p.stderr[-5000:]}"
    return out, p.stdout


def _evaluations(out):
    doc = json.loads((out / "eval.json").read_text())
    rope = json.loads((out / "eval_base_policy_rope.json").read_text())
    return {c["label"]: c for c in doc["checkpoints"] + rope["checkpoints"]}


def _cell(entry, task, length, key):
    rows = sorted((s for s in entry["samples"] if s["task"] == task and s["length"] == length), key=lambda s: s["seed"])
    return [s["seed"] for s in rows], [float(s[key]) for s in rows]


def test_summary_is_computed_from_the_evaluation(loop):
    out, stdout = loop
    summary = json.loads((out / "summary.json").read_text())
    ev = _evaluations(out)
    assert list(ev) == ["base", *ARMS, "base_policy_rope"]
    assert ev["base"]["rope_theta"] == 10000.0 and ev["base_policy_rope"]["rope_theta"] == 100000.0
    assert ev["base_policy_rope"]["path"] == ev["base"]["path"]  # the same checkpoint, scored at the policy's RoPE
    cells = {"long": ("kv_recall", 1024), "short": ("kv_recall", 128), "heldout_short": ("kv_assign", 128)}
    n = summary["samples_per_cell"]
    for row in ROWS:
        r = summary[row]
        for name, (task, length) in cells.items():
            seeds, exact = _cell(ev[row], task, length, "exact")
            assert seeds == _cell(ev["base"], task, length, "exact")[0] and len(seeds) == n  # paired samples
            k = int(sum(exact))
            assert r[name] == k / n and 0.0 <= r[name] <= 1.0
            assert r[f"{name}_ci"] == list(wilson_interval(k, n))
            lo, hi = r[f"{name}_ci"]
            assert lo <= r[name] <= hi
            if row != "base":
                base_exact = _cell(ev["base"], task, length, "exact")[1]
                diff = float(np.mean(np.array(exact) - np.array(base_exact)))
                assert math.isclose(r[f"{name}_change"], diff, abs_tol=1e-12)
                clo, chi = r[f"{name}_change_ci"]
                assert -1.0 <= clo <= diff <= chi <= 1.0
        assert math.isclose(r["long_loglik"], float(np.mean(_cell(ev[row], "kv_recall", 1024, "loglik")[1])))
    # the table printed at the end holds the same numbers
    for row in ROWS:
        r = summary[row]
        assert f"| {row} | {100 * r['long']:.1f}% [{100 * r['long_ci'][0]:.1f}, {100 * r['long_ci'][1]:.1f}]" in stdout


def test_grad_ratio_is_the_step1_term_norms(loop):
    out, stdout = loop
    summary = json.loads((out / "summary.json").read_text())
    for arm in ARMS:
        ratio = summary[arm]["grad_ratio"]
        if arm in ("longpo", "dpo"):
            norms = {}
            for term in ("nll", "preference"):
                cfg = json.loads((out / "grad_norms" / f"{arm}_{term}" / "config.json").read_text())
                assert (cfg["loss"]["lam"] == 0) == (term == "nll") and (cfg["loss"]["nll_weight"] == 0) == (term != "nll")
                (step1,) = [json.loads(x) for x in (out / "grad_norms" / f"{arm}_{term}" / "metrics.jsonl").read_text().splitlines()
                            if json.loads(x)["split"] == "train"]
                assert step1["step"] == 1 and ("nll_loss" in step1) == (term == "nll")
                norms[term] = step1["grad_norm"]
            assert ratio == norms["preference"] / norms["nll"] and ratio > 0
            assert f"{arm}: at step 1 the preference term's gradient norm is {ratio:.3g} x the NLL's" in stdout
        else:
            assert ratio is None


def test_arms_trained_on_the_same_data(loop):
    out, _ = loop
    configs = {a: json.loads((out / a / "config.json").read_text()) for a in ARMS}

    def common(c, arm):
        c = json.loads(json.dumps(c))
        assert c["loss"].pop("mode") == arm
        c.pop("reference")
        c["checkpoint"].pop("save")
        c["logging"].pop("metrics_jsonl")
        return c

    first = common(configs["longpo"], "longpo")
    assert first["loss"]["nll_target"] == "sequence"  # the paper's balance of terms
    for arm in ARMS:
        assert common(configs[arm], arm) == first, arm
    assert configs["longpo"]["reference"]["cache_path"].endswith("ref_longpo")
    assert configs["dpo"]["reference"]["cache_path"].endswith("ref_dpo")
    assert not configs["sft"]["reference"] and not configs["sft_rejected"]["reference"]
    logs = {a: [json.loads(x) for x in (out / a / "metrics.jsonl").read_text().splitlines()] for a in ARMS}
    iters = first["training"]["train_iters"]
    for arm, lines in logs.items():
        train = [x for x in lines if x["split"] == "train"]
        evals = [x for x in lines if x["split"] == "eval"]
        assert [x["step"] for x in train] == list(range(1, iters + 1))
        assert [x["step"] for x in evals] == list(range(1, iters + 1))
        assert all({"kv_recall/len1024/accuracy", "kv_assign/len128/accuracy"} <= set(x) for x in evals)
        assert ("logps/ref_chosen" in train[0]) == (arm in ("longpo", "dpo"))
        meta = json.loads((out / arm / "ckpt" / f"iter_{iters:07d}" / "longpo_meta.json").read_text())
        assert (meta["iteration"], meta["model"]["rope_theta"]) == (iters, 100000.0)  # the policy's raised base
    # same starting weights and the same first batch: the step-1 policy log-probs agree across arms
    step1 = {a: next(x for x in logs[a] if x["split"] == "train") for a in ARMS}
    for key in ("logps/chosen", "logps/rejected"):
        vals = [step1[a][key] for a in ARMS]
        assert max(vals) - min(vals) <= 1e-5 * abs(vals[0]), (key, vals)
    if (out / "accuracy_vs_length.png").exists():
        assert (out / "accuracy_vs_step.png").stat().st_size > 0


def test_pairs_are_answerable_from_their_chunk(loop):
    out, _ = loop
    recs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert recs, "generation kept no record"
    n = 0
    for r in recs:
        assert "let " not in r["document"]  # the held-out skill never appears in the LongPO data
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

    hf = transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    for task in (toy.TASK, toy.HELDOUT_TASK):
        samples = toy.TrainingSamples(out / "tokenizer", 48, 128, task=task)
        for seed in range(5):
            for length in (128, 1024):
                s = make_sample(task, length, seed, samples.template, samples.counter, samples.haystack)
                inst = s.instance
                msgs = [{"role": "user", "content": inst.intro + "".join(inst.context) + inst.question},
                        {"role": "assistant", "content": inst.answer_prefix + inst.answer + "."}]
                ids = hf.apply_chat_template(msgs, tokenize=True, return_dict=False)
                ids = np.asarray(ids["input_ids"] if isinstance(ids, dict) else ids)
                assert np.array_equal(ids[: len(s.tokens)], s.tokens), (task, seed, length)
                assert hf.decode(s.answer_tokens.tolist()) == inst.answer
