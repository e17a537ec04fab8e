"""Bad conversion inputs fail with a message naming the file / field, and leave nothing at --out."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from megatron_longpo.testing.convert import build_tiny_hf
from megatron_longpo.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed


def _attempt(kind: str, src: str, out: str, kwargs: dict) -> str:
    """Run one conversion in a worker (it may init torch.distributed); return 'Type: message'."""
    from megatron_longpo.convert import convert_hf_to_megatron, convert_megatron_to_hf

    fn = convert_hf_to_megatron if kind == "import" else convert_megatron_to_hf
    try:
        fn(src, out, progress=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - the test inspects the type and message
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.fixture(scope="module")
def sharded_hf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("err") / "hf"
    build_tiny_hf(d, "mistral", max_shard_size="60KB", tokenizer=False)
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def _corrupt(case: str, d: Path) -> None:
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if case == "unsupported_arch":
        cfg.update(architectures=["GemmaForCausalLM"], model_type="gemma")
    elif case == "shape_mismatch":
        cfg["intermediate_size"] += 32
    elif case == "missing_shard":
        _shards(d)[1].unlink()
    elif case == "truncated_shard":
        p = _shards(d)[-1]
        p.write_bytes(p.read_bytes()[:-100])
    elif case == "missing_tensor":
        cfg["num_hidden_layers"] += 1
    cfg_path.write_text(json.dumps(cfg))


CASES = {
    "unsupported_arch": r"ConversionError: .*config.json: architectures=\['GemmaForCausalLM'\].*not supported; supported:",
    "shape_mismatch": r"ConversionError: .*mlp.gate_proj.weight has shape \[128, 64\] but config.json implies \[160, 64\]",
    "missing_shard": r"ConversionError: .*shard\(s\) \['model-00002-of-0000\d.safetensors'\] listed in model.safetensors.index.json are missing",
    "truncated_shard": r"ConversionError: .*model-0000(\d)-of-0000\1.safetensors: truncated",
    "missing_tensor": r"ConversionError: .*tensor\(s\) that config.json implies are missing .*model.layers.2",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_hf_input_fails_clearly_and_writes_nothing(case, sharded_hf, tmp_path):
    src = _copy(sharded_hf, tmp_path / "hf")
    assert len(_shards(src)) >= 3
    _corrupt(case, src)
    out = tmp_path / "out"
    (msg,) = run_distributed(_attempt, 1, args=("import", str(src), str(out), {"dtype": "fp32"}))
    assert re.search(CASES[case], msg, re.S), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "something was left next to --out"


def test_existing_output_and_failed_verify_leave_nothing(sharded_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    (msg,) = run_distributed(_attempt, 1, args=("import", str(sharded_hf), str(out), {}))
    assert msg.startswith("ConversionError") and "--out" in msg and "already exists" in msg, msg
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # A conversion whose verification fails is removed again (tolerance below any difference).
    out2 = tmp_path / "out2"
    (msg,) = run_distributed(
        _attempt, 1, args=("import", str(sharded_hf), str(out2), {"dtype": "fp32", "verify": True, "verify_tolerance": -1.0})
    )
    assert msg.startswith("VerificationError") and "was not written" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_megatron_input_fails_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (msg,) = run_distributed(_attempt, 1, args=("export", str(empty), str(tmp_path / "o"), {}))
    assert msg.startswith("CheckpointError") and "is not a checkpoint" in msg, msg
    (empty / "latest_checkpointed_iteration.txt").write_text("3\n")
    (msg,) = run_distributed(_attempt, 1, args=("export", str(empty), str(tmp_path / "o"), {}))
    assert "points to iteration 3" in msg and "iter_0000003" in msg, msg
    assert not (tmp_path / "o").exists()
