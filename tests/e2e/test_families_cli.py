"""The CLIs on a mixture-of-experts family (Qwen3-MoE: 4 experts, top-2, q/k norm): convert with
--verify, tools/precompute_reference.py under torchrun (TP=2 with sequence parallelism, as MoE +
TP requires, experts split --ep 2 with --etp 1) equal to HF float64, and tools/evaluate.py at
TP=1, TP=2 and EP=2 with the same scores. Dense Qwen3 / Mixtral run the same library paths in
tests/distributed/test_families_reference.py (EP=2 caches bit-identical to EP=1 there).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.testing.reference import (
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
    ckpt = tmp_path / "ckpt"
    r = run(["tools/convert_hf_to_megatron.py", "--hf-dir", hf, "--out", ckpt, "--dtype", "fp32", "--verify",
             "--no-progress"])
    assert "verify:" in r.stdout and "OK" in r.stdout

    prefix = make_dataset(tmp_path / "data" / "train", synthetic_records(6, seed=4))
    cache = tmp_path / "ref_cache"
    run(torchrun(2, "tools/precompute_reference.py", "--load", ckpt, "--data", prefix, "--output", cache,
                 "--tokens-per-batch", "256", "--tp", "2", "--ep", "2", "--etp", "1", "--no-progress"))
    assert {k: json.loads((cache / "meta.json").read_text())["compute"][k] for k in ("tp", "ep", "etp")} == \
        {"tp": 2, "ep": 2, "etp": 1}
    _, flat, seqs = reference_items(prefix)
    got = np.load(cache / "turns.npy").reshape(-1)[flat]
    np.testing.assert_allclose(got, hf_float64_sums(hf, seqs), rtol=1e-6, atol=1e-4)

    suite = ["--tasks", "niah_single,kv_retrieval", "--lengths", "512", "--samples", "2", "--no-progress"]
    run(torchrun(1, "tools/evaluate.py", "--load", ckpt, *suite, "--output", tmp_path / "tp1.json"))
    run(torchrun(2, "tools/evaluate.py", "--load", ckpt, *suite, "--tp", "2", "--sequence-parallel",
                 "--output", tmp_path / "tp2.json"))
    run(torchrun(2, "tools/evaluate.py", "--load", ckpt, *suite, "--ep", "2", "--output", tmp_path / "ep2.json"))
    docs = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("tp1", "tp2", "ep2")}
    assert docs["ep2"]["parallel"]["ep"] == 2 and docs["ep2"]["parallel"]["dp"] == 2
    a = docs["tp1"]["checkpoints"][0]["samples"]
    assert len(a) == 4
    for name in ("tp2", "ep2"):
        got = docs[name]["checkpoints"][0]
        assert [(s["task"], s["tokens"], s["exact"], s["matches"]) for s in a] == \
            [(s["task"], s["tokens"], s["exact"], s["matches"]) for s in got["samples"]], name
        assert got["mean_accuracy"] == docs["tp1"]["checkpoints"][0]["mean_accuracy"], name
        assert max(abs(x["loglik"] - y["loglik"]) for x, y in zip(a, got["samples"])) < 1e-4, name
