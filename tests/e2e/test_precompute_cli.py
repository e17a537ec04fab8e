"""tools/precompute_reference.py end to end: HF model -> converter CLI -> torchrun precompute on 2
ranks, interrupted (exit 3, as if killed after one batch per rank) and resumed (exit 0) -> a cache
the trainer's check accepts, with values equal to a float64 HF forward; then a CLI error (exit 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from megatron_longpo.config import LongPOConfig
from megatron_longpo.data.indexed import PreferenceDataset
from megatron_longpo.reference.source import check_reference_cache
from megatron_longpo.testing.reference import hf_float64_sums, make_dataset, make_hf_model, synthetic_records

ROOT = Path(__file__).resolve().parents[2]


def run(args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_precompute_cli_resume_and_errors(tmp_path):
    hf = make_hf_model(tmp_path / "hf", seed=4)
    ckpt = tmp_path / "ckpt"
    r = run(["tools/convert_hf_to_megatron.py", "--hf-dir", str(hf), "--out", str(ckpt), "--dtype", "fp32", "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    prefix = make_dataset(tmp_path / "data" / "train", synthetic_records(8, seed=9))
    cache = tmp_path / "ref_cache"
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "tools/precompute_reference.py",
           "--load", str(ckpt), "--data", prefix, "--output", str(cache), "--tokens-per-batch", "256"]

    r = run(cmd + ["--stop-after-batches", "1"])
    # torchrun reports a failed worker as 1; the workers' own exit code 3 means "interrupted".
    assert r.returncode != 0 and "exitcode  : 3" in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    assert not cache.exists() and len(list(Path(str(cache) + ".partial").glob("part-*.jsonl"))) == 2

    r = run(cmd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resuming" in r.stdout and "2 of" in r.stdout, r.stdout
    assert "tok/s" in r.stderr and "reference longpo (rank 0 of dp=2)" in r.stderr  # tqdm bar with rate / ETA
    assert f"reference cache written to {cache}" in r.stdout

    cfg = LongPOConfig()
    cfg.reference.cache_path, cfg.reference.load = str(cache), str(ckpt)
    c = check_reference_cache(cfg, prefix)  # what the trainer checks at start-up
    ds = PreferenceDataset(prefix)
    seqs = [s for i in range(len(ds)) for ref in ds[i].references for s in
            ((ref.chosen, ref.chosen_mask), (ref.rejected, ref.rejected_mask))]
    got = np.concatenate([np.asarray(c.turns)[i, : ds.num_turns[i]].reshape(-1) for i in range(len(ds))])
    np.testing.assert_allclose(got, hf_float64_sums(hf, seqs), rtol=1e-6, atol=1e-4)
    assert json.loads((cache / "meta.json").read_text())["compute"]["world_size"] == 2

    r = run(["tools/precompute_reference.py", "--load", str(ckpt), "--data", prefix, "--output", str(cache)])
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr, r.stderr[-2000:]
