"""tools/evaluate.py under torchrun on a quickstart-style checkpoint (tiny HF Llama -> converter),
at TP=1, TP=2 and CP=2 with the same scores; its error path; in-training evaluation metrics in
the metrics JSONL, TensorBoard and the console; and the CLI on the trained checkpoint reproducing
the in-training scores of the same step.

Scores across layouts: exact-match flags and argmax-match counts identical, answer
log-likelihoods within 1e-4 (fp32, different reduction orders). Correctness of the scores
themselves against HF float64 is tests/distributed/test_eval_scoring.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longpo.evaluation.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
pytestmark = pytest.mark.slow

SUITE = ["--tasks", "niah_single,variable_tracking,kv_retrieval", "--lengths", "512,1k", "--samples", "2"]


def _run(args, timeout=600, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def _torchrun(nproc, *args):
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    _run([PY, "examples/make_tiny_base_model.py", "--out", d / "hf_base"])
    _run([PY, "tools/convert_hf_to_megatron.py", "--hf-dir", d / "hf_base", "--out", d / "base", "--dtype", "fp32",
          "--no-progress"])
    return d


def _scores(doc):
    return [[(s["task"], s["length"], s["seed"], s["tokens"], s["exact"], s["answer_tokens"], s["matches"])
             for s in c["samples"]] for c in doc["checkpoints"]]


def _logliks(doc):
    return [[s["loglik"] for s in c["samples"]] for c in doc["checkpoints"]]


def test_evaluate_tp1_tp2_cp2_pp2_identical(base):
    d = base
    r = _run(_torchrun(1, "tools/evaluate.py", "--load", d / "base", d / "base", "--labels", "a,b", *SUITE,
                       "--output", d / "tp1.json", "--plot", d / "tp1.png"))
    assert "teacher-forced exact match" in r.stdout and "niah_single" in r.stdout, r.stdout
    assert "tok/s" in r.stderr  # progress bar with rate / ETA
    ref = json.loads((d / "tp1.json").read_text())
    assert ref["format"] == "megatron_longpo.evaluation" and [c["label"] for c in ref["checkpoints"]] == ["a", "b"]
    res = ref["checkpoints"][0]["results"]
    assert set(res) == {"niah_single", "variable_tracking", "kv_retrieval"} and set(res["kv_retrieval"]) == {"512", "1024"}
    cell = res["niah_single"]["1024"]
    assert cell["num_samples"] == 2 and 0.0 <= cell["accuracy"] <= 1.0 and cell["mean_loglik"] < 0
    assert (d / "tp1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _scores(ref)[0] == _scores(ref)[1]
    # every accuracy carries its 95% Wilson interval, from the per-sample exact matches
    for task, by_len in res.items():
        for n, c in by_len.items():
            k = sum(s["exact"] for s in ref["checkpoints"][0]["samples"] if s["task"] == task and s["length"] == int(n))
            assert c["accuracy"] == k / c["num_samples"]
            assert c["accuracy_ci"] == list(wilson_interval(k, c["num_samples"]))
            assert c["accuracy_ci"][0] <= c["accuracy"] <= c["accuracy_ci"][1]
            assert f"{100 * c['accuracy']:.1f}% [" in r.stdout  # the table shows it too
    # --rope-theta scores the same checkpoint at another RoPE base: same samples, other log-likelihoods
    _run(_torchrun(1, "tools/evaluate.py", "--load", d / "base", *SUITE, "--rope-theta", "1e5", "--no-progress",
                   "--output", d / "rope.json"))
    rope = json.loads((d / "rope.json").read_text())
    assert rope["checkpoints"][0]["rope_theta"] == 1e5 and ref["checkpoints"][0]["rope_theta"] != 1e5
    assert [s["seed"] for s in rope["checkpoints"][0]["samples"]] == [s["seed"] for s in ref["checkpoints"][0]["samples"]]
    assert _logliks(rope)[0] != _logliks(ref)[0]

    for name, layout in (("tp2", ["--tp", "2"]), ("cp2", ["--cp", "2"]), ("pp2", ["--pp", "2"])):
        _run(_torchrun(2, "tools/evaluate.py", "--load", d / "base", d / "base", "--labels", "a,b", *SUITE, *layout,
                       "--output", d / f"{name}.json", "--no-progress"))
        got = json.loads((d / f"{name}.json").read_text())
        assert _scores(got) == _scores(ref), name
        for g, w in zip(_logliks(got), _logliks(ref)):
            assert max(abs(x - y) for x, y in zip(g, w)) < 1e-4, name
        for g, w in zip(got["checkpoints"], ref["checkpoints"]):
            assert g["mean_accuracy"] == w["mean_accuracy"]


def test_evaluate_errors(base):
    d = base
    r = _run([PY, "tools/evaluate.py", "--load", d / "base", "--tasks", "niah_singel", "--lengths", "512",
              "--output", d / "x.json"], check=False)
    assert r.returncode == 2 and "unknown task(s) ['niah_singel']" in r.stderr, r.stderr[-2000:]
    r = _run([PY, "tools/evaluate.py", "--load", d / "nope", "--lengths", "512", "--output", d / "x.json"], check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr[-2000:]
    # expert parallelism on a dense checkpoint: refused before any process group, naming both options
    r = _run([PY, "tools/evaluate.py", "--load", d / "base", "--lengths", "512", "--ep", "2", "--etp", "2",
              "--output", d / "x.json"], check=False)
    assert r.returncode == 2 and f"--ep 2 needs a mixture-of-experts model but --load {d / 'base'} is dense" in r.stderr \
        and "; --etp 2 needs a mixture-of-experts model" in r.stderr and "drop --etp" in r.stderr, r.stderr[-2000:]
    assert not (d / "x.json").exists()


def test_in_training_evaluation_logged(base):
    d = base
    _run([PY, "tools/preprocess_data.py", "--input", "examples/data/sample_longpo.jsonl", "--tokenizer",
          "examples/data/tokenizer.model", "--output-prefix", d / "data/train", "--max-seq-length", "2048",
          "--no-progress"])
    run = d / "run"
    over = {
        "parallel.tensor_model_parallel_size": 1, "data.train_data": d / "data/train", "loss.mode": "sft",
        "reference.cache_path": "", "reference.load": "", "checkpoint.load": d / "base", "checkpoint.save": run / "ckpt",
        "training.train_iters": 2, "training.global_batch_size": 2, "training.eval_interval": 2,
        "evaluation.tasks": "[niah_single,kv_retrieval]", "evaluation.lengths": "[512,1024]", "evaluation.samples": 2,
        "logging.metrics_jsonl": run / "metrics.jsonl", "logging.tensorboard_dir": run / "tb",
    }
    r = _run(_torchrun(1, "pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml",
                       *[f"--{k}={v}" for k, v in over.items()]))
    assert "[eval] step 2/2 | len 512: mean" in r.stdout and "kv_retrieval" in r.stdout, r.stdout[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ev = [x for x in rows if x["split"] == "eval"]
    assert len(ev) == 1 and ev[0]["step"] == 2
    keys = {"niah_single/len512/accuracy", "kv_retrieval/len1024/loglik", "mean/len1024/accuracy"}
    assert keys <= set(ev[0]) and ev[0]["kv_retrieval/len1024/loglik"] < 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/niah_single/len512/accuracy", "eval/mean/len1024/accuracy", "train/loss"} <= tags, tags
    (ev_loglik,) = acc.Scalars("eval/kv_retrieval/len1024/loglik")
    assert ev_loglik.step == 2 and abs(ev_loglik.value - ev[0]["kv_retrieval/len1024/loglik"]) < 1e-3
    # The CLI on the trained checkpoint (policy rope_theta from its own meta) reproduces the
    # in-training scores of the same step, and reads the base with its original rope_theta.
    _run(_torchrun(1, "tools/evaluate.py", "--load", d / "base", run / "ckpt", "--tasks", "niah_single,kv_retrieval",
                   "--lengths", "512,1024", "--samples", "2", "--output", run / "eval.json", "--no-progress"))
    doc = json.loads((run / "eval.json").read_text())
    assert [c["rope_theta"] for c in doc["checkpoints"]] == [10000.0, 100000.0]
    trained = doc["checkpoints"][1]
    assert trained["iteration"] == 2
    for task in ("niah_single", "kv_retrieval"):
        for n in ("512", "1024"):
            cell = trained["results"][task][n]
            assert cell["accuracy"] == ev[0][f"{task}/len{n}/accuracy"]
            assert abs(cell["mean_loglik"] - ev[0][f"{task}/len{n}/loglik"]) < 1e-4
