"""Model checkpoint API (megatron_longpo.checkpoint): reshard, atomic saves, config validation.

- weights saved at TP=2 load at TP=1 equal to the TP=2 weights gathered (and back), including a
  vocabulary whose padding differs between the two TP sizes;
- the latest pointer moves only after a complete save: a save that fails midway leaves the
  previous checkpoint current and no final iteration directory;
- loading into a model of another shape fails before reading tensors, naming the field;
- a bf16 checkpoint loads into an fp32 model (values upcast exactly).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, tiny_model_config

pytestmark = pytest.mark.distributed

# vocab 300 pads to 384 at TP=1 and 512 at TP=2: the stored global shape differs between them.
CFG = dict(arch="mistral", vocab_size=300)


def _model(tp: int, seed: int, **overrides):
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed

    cfg = tiny_model_config(CFG["arch"], vocab_size=CFG["vocab_size"], **overrides)
    pcfg = parallel_config(tp=tp)
    groups = init_model_parallel(pcfg)
    set_seed(seed)
    return cfg, build_model(cfg, pcfg), groups


def _save(run: str, tp: int, seed: int, iteration: int, fail: bool = False, **overrides) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_longpo.checkpoint import save_model_checkpoint
    from megatron_longpo.models.sharding import gather_full_state_dict

    cfg, model, g = _model(tp, seed, **overrides)
    if fail:  # the dist save dies after writing part of the files
        real = dist_checkpointing.save

        def broken(sd, path, *a, **k):
            (Path(path) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError("disk full (simulated)")

        dist_checkpointing.save = broken
        try:
            save_model_checkpoint(run, model, cfg, iteration=iteration)
        except OSError:
            return {}
        finally:
            dist_checkpointing.save = real
        raise AssertionError("simulated failure did not propagate")
    save_model_checkpoint(run, model, cfg, iteration=iteration, extra_meta={"note": f"seed {seed}"})
    return gather_full_state_dict(model, g.tp_group, cfg.vocab_size)


def _load(run: str, tp: int, pass_cfg: bool = True, strict: bool = True, **overrides) -> dict:
    from megatron_longpo.checkpoint import load_model_checkpoint
    from megatron_longpo.models.sharding import gather_full_state_dict

    cfg, model, g = _model(tp, 1000, **overrides)
    try:
        meta = load_model_checkpoint(run, model, cfg if pass_cfg else None, strict=strict)
    except Exception as e:  # noqa: BLE001 - returned for inspection
        return {"error": f"{type(e).__name__}: {e}"}
    return {"meta_iteration": meta.iteration, "params": gather_full_state_dict(model, g.tp_group, cfg.vocab_size)}


def _save_without(run: str, drop_suffixes: tuple) -> dict:
    """Save a checkpoint that lacks the entries ending in ``drop_suffixes`` (written by another tool)."""
    from megatron_longpo.checkpoint import save_sharded_checkpoint
    from megatron_longpo.models.sharding import gather_full_state_dict

    cfg, model, g = _model(1, 5)
    sd = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith(drop_suffixes)}
    save_sharded_checkpoint(run, sd, cfg)
    return gather_full_state_dict(model, g.tp_group, cfg.vocab_size)


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_save_tp2_load_tp1_and_back_with_atomic_latest_pointer(tmp_path):
    from megatron_longpo.checkpoint import LATEST_FILE, read_meta, read_model_config, resolve_checkpoint_dir

    run = str(tmp_path / "run")
    saved = run_distributed(_save, 2, args=(run, 2, 1, 5))
    _assert_same(saved[0], saved[1])
    (got,) = run_distributed(_load, 1, args=(run, 1))
    assert got["meta_iteration"] == 5
    _assert_same(got["params"], saved[0])
    assert (tmp_path / "run" / LATEST_FILE).read_text().strip() == "5"
    meta = read_meta(run)
    assert meta.extra["note"] == "seed 1" and meta.format_version == 1
    assert read_model_config(tmp_path / "run" / "iter_0000005") == read_model_config(run)

    # TP=1 -> TP=2, a newer iteration becomes current.
    (saved1,) = run_distributed(_save, 1, args=(run, 1, 2, 8))
    for out in run_distributed(_load, 2, args=(run, 2)):
        assert out["meta_iteration"] == 8
        _assert_same(out["params"], saved1)

    # A save that fails midway (an error, not a kill): no iter_0000009, pointer still at 8, and its
    # .tmp dir removed (checkpoint/model_io: earlier checkpoints kept, nothing half-written left).
    run_distributed(_save, 2, args=(run, 2, 3, 9, True))
    assert resolve_checkpoint_dir(run).name == "iter_0000008"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["iter_0000005", "iter_0000008", LATEST_FILE]
    # Re-saving iteration 8 replaces it; the stale .tmp of a crashed save is not mistaken for data.
    (saved2,) = run_distributed(_save, 1, args=(run, 1, 4, 8))
    (got,) = run_distributed(_load, 1, args=(run, 1))
    _assert_same(got["params"], saved2)
    assert json.loads((tmp_path / "run" / "iter_0000008" / "longpo_meta.json").read_text())["note"] == "seed 4"


def test_mismatching_model_fails_naming_the_field(tmp_path):
    run = str(tmp_path / "run")
    run_distributed(_save, 1, args=(run, 1, 1, 0))
    (out,) = run_distributed(_load, 1, args=(run, 1), kwargs={"num_layers": 3})
    assert out["error"].startswith("CheckpointError") and "model.num_layers is 3 but the checkpoint has 2" in out["error"]
    # Without a ModelConfig the model's own TransformerConfig is checked.
    (out,) = run_distributed(_load, 1, args=(run, 1, False), kwargs={"ffn_hidden_size": 64})
    assert "model.ffn_hidden_size is 64 but the checkpoint has 96" in out["error"], out
    (out,) = run_distributed(_load, 1, args=(run, 1), kwargs={"tie_word_embeddings": True})
    assert "model.tie_word_embeddings is True" in out["error"], out
    # Fields a run may change on purpose (rope base, max positions) load fine.
    (out,) = run_distributed(_load, 1, args=(run, 1), kwargs={"rope_theta": 1e7, "max_position_embeddings": 8192})
    assert "params" in out, out


def test_strict_load_needs_every_tensor_but_not_extra_state(tmp_path):
    # Module _extra_state (TE FP8 metadata, None for local layers) may be absent: fresh is correct.
    (saved,) = run_distributed(_save_without, 1, args=(str(tmp_path / "a"), ("_extra_state",)))
    for out in run_distributed(_load, 2, args=(str(tmp_path / "a"), 2)):
        _assert_same(out["params"], saved)
    # A missing weight fails a strict load by name; strict=False keeps the model's own value.
    (saved,) = run_distributed(_save_without, 1, args=(str(tmp_path / "b"), ("final_layernorm.weight",)))
    (out,) = run_distributed(_load, 1, args=(str(tmp_path / "b"), 1))
    assert out["error"].startswith("CheckpointError") and "decoder.final_layernorm.weight" in out["error"], out
    (out,) = run_distributed(_load, 1, args=(str(tmp_path / "b"), 1, True, False))
    for k, t in saved.items():
        if k != "decoder.final_layernorm.weight":
            assert torch.equal(out["params"][k], t), k
    assert torch.equal(out["params"]["decoder.final_layernorm.weight"], torch.ones(64))  # RMSNorm init


def test_bf16_checkpoint_loads_into_fp32_model(tmp_path):
    run = str(tmp_path / "run")
    (saved,) = run_distributed(_save, 1, args=(run, 1, 1, 0), kwargs={"params_dtype": "bf16"})
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    (got,) = run_distributed(_load, 1, args=(run, 1), kwargs={"params_dtype": "fp32"})
    for k, t in saved.items():
        assert got["params"][k].dtype == torch.float32 and torch.equal(got["params"][k], t.float()), k


def test_checkpoint_paths_fail_clearly(tmp_path):
    from megatron_longpo.checkpoint import CheckpointError, resolve_checkpoint_dir

    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "nope")
    (tmp_path / "iter_0000001.tmp").mkdir()
    with pytest.raises(CheckpointError, match=r"not a checkpoint.*incomplete save\(s\) \['iter_0000001.tmp'\]"):
        resolve_checkpoint_dir(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("x\n")
    with pytest.raises(CheckpointError, match="expected an iteration number"):
        resolve_checkpoint_dir(tmp_path)

