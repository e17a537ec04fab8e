"""The conversion CLIs end to end: HF -> Megatron (--verify) -> HF, and a clean failure (exit 2).

(Export --verify and the numerics are covered in-process by tests/distributed/test_convert_models.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longpo.testing.convert import build_tiny_hf

ROOT = Path(__file__).resolve().parents[2]


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *args, "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_cli_round_trip_with_verify(tmp_path):
    build_tiny_hf(tmp_path / "hf", "qwen2")  # GQA 7, QKV bias, tied embeddings
    r = _cli("convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--verify")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "verify: max |logit diff|" in r.stdout and ": OK" in r.stdout, r.stdout
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    meta = json.loads((tmp_path / "ckpt" / "iter_0000000" / "longpo_meta.json").read_text())
    assert meta["model"]["params_dtype"] == "bf16" and meta["source"]["architecture"] == "Qwen2ForCausalLM"

    r = _cli("convert_megatron_to_hf.py", "--megatron-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout, r.stdout
    names = {p.name for p in (tmp_path / "back").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["dtype"] == "bfloat16"


def test_cli_fails_cleanly_on_unsupported_architecture(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    r = _cli("convert_hf_to_megatron.py", "--hf-dir", str(hf), "--out", str(tmp_path / "ckpt"))
    assert r.returncode == 2
    assert "error:" in r.stderr and "GPT2LMHeadModel" in r.stderr and "supported:" in r.stderr, r.stderr
    assert not (tmp_path / "ckpt").exists()
