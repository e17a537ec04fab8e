"""The CLIs on a mixture-of-experts family (Qwen3-MoE: 4 experts, top-2, q/k norm): convert with
--verify, tools/precompute_reference.py under torchrun (DP=2) equal to HF float64, and
tools/evaluate.py at TP=1 and TP=2 (sequence-parallel, as MoE + TP requires) with the same scores.
Dense Qwen3 / Mixtral run the same library paths in tests/distributed/test_families_reference.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.testing.reference import (
    SAMPLE_TOKENIZER,
    hf_float64_sums,
    make_dataset,
    make_hf_model,
    reference_items,
    synthetic_records,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, *[str(a) for a in args]], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r


def torchrun(nproc, *args):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def test_moe_family_convert_precompute_evaluate(tmp_path):
    hf = make_hf_model(tmp_path / "hf", seed=2, family="qwen3_moe", max_position_embeddings=4096)
    shutil.copy(SAMPLE_TOKENIZER, hf / "tokenizer.model")
    ckpt = tmp_path / "ckpt"
    r = run(["tools/convert_hf_to_megatron.py", "--hf-dir", hf, "--out", ckpt, "--dtype", "fp32", "--verify",
             "--no-progress"])
    assert "verify:" in r.stdout and "OK" in r.stdout

    prefix = make_dataset(tmp_path / "data" / "train", synthetic_records(6, seed=4))
    cache = tmp_path / "ref_cache"
    run(torchrun(2, "tools/precompute_reference.py", "--load", ckpt, "--data", prefix, "--output", cache,
                 "--tokens-per-batch", "256", "--no-progress"))
    _, flat, seqs = reference_items(prefix)
    got = np.load(cache / "turns.npy").reshape(-1)[flat]
    np.testing.assert_allclose(got, hf_float64_sums(hf, seqs), rtol=1e-6, atol=1e-4)

    suite = ["--tasks", "niah_single,kv_retrieval", "--lengths", "512", "--samples", "2", "--no-progress"]
    run(torchrun(1, "tools/evaluate.py", "--load", ckpt, *suite, "--output", tmp_path / "tp1.json"))
    run(torchrun(2, "tools/evaluate.py", "--load", ckpt, *suite, "--tp", "2", "--sequence-parallel",
                 "--output", tmp_path / "tp2.json"))
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["checkpoints"][0]["samples"] for n in ("tp1", "tp2"))
    assert len(a) == 4
    assert [(s["task"], s["tokens"], s["exact"], s["matches"]) for s in a] == \
        [(s["task"], s["tokens"], s["exact"], s["matches"]) for s in b]
    assert max(abs(x["loglik"] - y["loglik"]) for x, y in zip(a, b)) < 1e-4
