"""The released LongPO data end to end: parquet in the authors' schema (built locally with pyarrow)
-> tools/import_released_data.py -> tools/precompute_reference.py (cache equal to a float64 HF
forward on the same ids) -> pretrain_longpo.py trains a few RMSprop steps in both pair layouts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.config import LongPOConfig
from megatron_longpo.data.indexed import PreferenceDataset
from megatron_longpo.testing.released import released_rows, write_parquet
from megatron_longpo.reference.source import check_reference_cache
from megatron_longpo.testing.reference import SAMPLE_TOKENIZER, hf_float64_sums, make_dataset, synthetic_records

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
pytestmark = pytest.mark.slow


def run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    p = subprocess.run([PY, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def torchrun(*args):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *args]


def test_released_parquet_trains_and_its_reference_matches_hf(tmp_path):
    pre = PreferenceDataset(make_dataset(tmp_path / "pre" / "train", synthetic_records(6, seed=2)))
    parquet = write_parquet(released_rows([pre[i] for i in range(len(pre))]), tmp_path / "train-00000.parquet")
    data = tmp_path / "data" / "train"
    r = run(["tools/import_released_data.py", "--input", parquet, "--tokenizer", SAMPLE_TOKENIZER,
             "--output-prefix", data, "--no-progress"])
    assert "6 rows read from 1 file(s), 6 written" in r.stdout
    run(["examples/make_tiny_base_model.py", "--out", tmp_path / "hf"])
    run(["tools/convert_hf_to_megatron.py", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "base", "--dtype", "fp32",
         "--no-progress"])
    cache = tmp_path / "ref_cache"
    run(torchrun("tools/precompute_reference.py", "--load", str(tmp_path / "base"), "--data", str(data),
                 "--output", str(cache)))
    cfg = LongPOConfig()
    cfg.reference.cache_path, cfg.reference.load = str(cache), str(tmp_path / "base")
    c = check_reference_cache(cfg, str(data))
    ds = PreferenceDataset(str(data))
    seqs = [s for i in range(len(ds)) for ref in ds[i].references for s in
            ((ref.chosen, ref.chosen_mask), (ref.rejected, ref.rejected_mask))]
    got = np.concatenate([np.asarray(c.turns)[i, : ds.num_turns[i]].reshape(-1) for i in range(len(ds))])
    np.testing.assert_allclose(got, hf_float64_sums(tmp_path / "hf", seqs), rtol=1e-6, atol=1e-4)

    for layout in ("two_sequences", "shared_prefix"):
        o = {"parallel.tensor_model_parallel_size": 1, "data.train_data": data, "data.pair_layout": layout,
             "reference.cache_path": cache, "reference.load": tmp_path / "base", "checkpoint.load": tmp_path / "base",
             "checkpoint.save": tmp_path / layout / "ckpt", "logging.tensorboard_dir": tmp_path / layout / "tb",
             "logging.metrics_jsonl": tmp_path / layout / "metrics.jsonl", "training.train_iters": 3,
             "training.global_batch_size": 2, "optim.optimizer": "rmsprop", "optim.use_distributed_optimizer": "false",
             "optim.lr_warmup_fraction": 0.0}
        run(torchrun("pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml", *[f"--{k}={v}" for k, v in o.items()]))
        steps = [json.loads(x) for x in (tmp_path / layout / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in steps if m["split"] == "train"]
        assert [m["step"] for m in steps] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in steps)
        assert all(np.isfinite(m["logps/ref_chosen"]) for m in steps)
