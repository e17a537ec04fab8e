"""Entry points answer --help and config errors without importing torch / megatron-core, and a
config error is printed once (rank 0) with exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = "examples/configs/tiny_cpu.yaml"


def _run(args, **env):
    return subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **env))


def _imported(p) -> set:
    # -X importtime writes one "import time: ... | <module>" line per import to stderr.
    return {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [
    ["pretrain_longpo.py", "--help"],
    ["tools/precompute_reference.py", "--help"],
    ["tools/estimate_memory.py", "--help"],
    ["tools/generate_longpo_data.py", "--help"],
    ["tools/evaluate.py", "--help"],
    ["pretrain_longpo.py", "--config", TINY, "--parallel.tensor_model_parallel_size=3"],
    ["tools/estimate_memory.py", "--config", TINY, "--world-size", "2", "--parallel.tensor_model_parallel_size=3"],
], ids=["train-help", "precompute-help", "estimate-help", "generate-help", "evaluate-help", "train-config-error", "estimate-config-error"])
def test_answers_without_heavy_imports(args):
    p = _run(args)
    mods = _imported(p)
    heavy = [m for m in mods if m.split(".")[0] in ("torch", "transformers", "vllm") or m.startswith("megatron.core")]
    assert not heavy, heavy[:5]
    if "--help" in args:
        assert p.returncode == 0 and "usage:" in p.stdout
    else:
        assert p.returncode == 2 and "num_attention_heads (4) must be divisible" in p.stderr
        assert "Traceback" not in p.stderr


def test_config_error_printed_by_rank0_only():
    bad = ["pretrain_longpo.py", "--config", TINY, "--parallel.tensor_model_parallel_size=3"]
    r0 = subprocess.run([sys.executable, *bad], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, RANK="0", WORLD_SIZE="2"))
    r1 = subprocess.run([sys.executable, *bad], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, RANK="1", WORLD_SIZE="2"))
    assert r0.returncode == r1.returncode == 2
    assert r0.stderr.count("[longpo] error:") == 1 and r1.stderr == "" and r1.stdout == ""


@pytest.mark.parametrize("value", ["512,2kk", "inf", "1.5k", "0", "-4", "4096,,k"])
def test_evaluate_lengths_strict(value):
    """--lengths 2kk once ran 2048 and inf gave a traceback: every malformed length is refused by name."""
    p = _run(["tools/evaluate.py", "--load", "x", "--output", "o.json", "--lengths", value])
    assert p.returncode == 2 and "argument --lengths" in p.stderr and "Traceback" not in p.stderr, p.stderr[-500:]
    assert "torch" not in _imported(p)


def test_evaluate_lengths_parsed():
    from megatron_longpo.evaluation.args import parse_lengths

    assert parse_lengths("4096, 128k,2K") == [4096, 131072, 2048]
