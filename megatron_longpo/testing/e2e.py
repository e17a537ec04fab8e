"""End-to-end test helpers: run the real CLIs (under torchrun) from the repository root, build the
quickstart inputs a user builds before training, and read a run's outputs back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from megatron_longpo.checkpoint import load_model_checkpoint, read_model_config
from megatron_longpo.models.provider import build_model
from megatron_longpo.runtime.distributed import init_model_parallel
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def run_cli(args, timeout=600, check=True, **kw) -> subprocess.CompletedProcess:
    """Run ``args`` in the repository root; with ``check``, fail with the tails of its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, *args) -> list:
    """The command line of ``args`` under torchrun with ``nproc`` processes on a free port."""
    return [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
            *map(str, args)]


def prepare_quickstart(d: Path, nproc: int = 2) -> Path:
    """The quickstart inputs in ``d``, made with the real CLIs: the indexed dataset of the bundled
    sample (data/train), a tiny HF base model converted to Megatron (base) and the reference cache
    (ref_cache, computed on ``nproc`` processes)."""
    run_cli([PY, "tools/preprocess_data.py", "--input", "examples/data/sample_longpo.jsonl", "--tokenizer",
         "examples/data/tokenizer.model", "--output-prefix", d / "data/train", "--max-seq-length", "2048",
         "--no-progress"])
    run_cli([PY, "examples/make_tiny_base_model.py", "--out", d / "hf_base"])
    run_cli([PY, "tools/convert_hf_to_megatron.py", "--hf-dir", d / "hf_base", "--out", d / "base", "--dtype", "fp32"])
    run_cli(torchrun(nproc, "tools/precompute_reference.py", "--load", d / "base", "--data", d / "data/train",
                 "--output", d / "ref_cache", "--mode", "longpo", "--no-progress"))
    return d


def train_overrides(d: Path, run_name: str, **extra) -> list:
    """``--section.key=value`` options of a training run ``run_name`` on the quickstart inputs in ``d``."""
    o = {
        "data.train_data": d / "data/train", "reference.cache_path": d / "ref_cache", "reference.load": d / "base",
        "checkpoint.load": d / "base", "checkpoint.save": d / run_name / "ckpt",
        "logging.tensorboard_dir": d / run_name / "tb", "logging.metrics_jsonl": d / run_name / "metrics.jsonl",
        **extra,
    }
    return [f"--{k}={v}" for k, v in o.items()]


def read_metrics(d: Path, run_name: str) -> list[dict]:
    """Every row of the run's metrics.jsonl."""
    return [json.loads(line) for line in (d / run_name / "metrics.jsonl").read_text().splitlines()]


def final_weights(ckpt_dir) -> dict:
    """The model weights of a checkpoint (latest iteration), loaded in a one-process gloo worker."""
    return run_distributed(_load_weights, 1, args=(str(ckpt_dir),))[0]


def _load_weights(ckpt_dir):
    cfg = read_model_config(ckpt_dir)
    init_model_parallel(parallel_config())
    model = build_model(cfg, parallel_config())
    load_model_checkpoint(ckpt_dir, model, cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def wait_latest(proc: subprocess.Popen, ckpt: Path, at_least: int, timeout: float = 300) -> int:
    """Wait until run dir ``ckpt`` points at iteration >= ``at_least`` while ``proc`` (stdout piped) runs."""
    f = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if f.exists() and int(f.read_text()) >= at_least:
            return int(f.read_text())
        assert proc.poll() is None, proc.stdout.read()[-5000:]
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint >= {at_least} in {ckpt}")
