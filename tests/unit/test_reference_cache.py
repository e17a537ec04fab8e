"""Reference cache format and start-up checks (no model, no process group).

Every failure case of the cache check must raise ReferenceCacheError whose message names the
mismatch AND carries the exact command that rebuilds the cache. Datasets are real preprocessed
datasets (bundled tokenizer); checkpoints are model-checkpoint directories with their real
metadata file and a data file (their identity is all the check reads). Also: batching plan
properties, item ids vs the dataset, per-turn sums, the cached source's lookups, atomic writes and
the precompute's cheap option / input checks.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_longpo.checkpoint.format import META_FILE, CheckpointMeta, iter_dir_name
from megatron_longpo.config import ConfigError, LongPOConfig, ModelConfig
from megatron_longpo.data.indexed import PreferenceDataset, load_metadata
from megatron_longpo.data.layout import build_pair_batch
from megatron_longpo.reference.cache import ReferenceCacheError, rebuild_command, write_cache
from megatron_longpo.reference.compute import (
    item_lengths,
    item_sequences,
    num_turn_slots,
    padded_length,
    plan_batches,
    split_id,
    sum_turns,
)
from megatron_longpo.reference.fingerprint import dataset_identity
from megatron_longpo.reference.model import read_reference_checkpoint
from megatron_longpo.reference.precompute import (
    PrecomputeError,
    PrecomputeOptions,
    precompute,
    prepare_partial,
    read_parts,
)
from megatron_longpo.reference.source import CachedReference, check_reference_cache, open_reference
from megatron_longpo.testing.reference import make_dataset, synthetic_records

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
REF_MODEL = ModelConfig(arch="mistral", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                        num_query_groups=2, vocab_size=768, rope_theta=1e6)


def fake_checkpoint(run: Path, iteration: int = 0, model: ModelConfig = REF_MODEL, payload: bytes = b"w" * 100) -> Path:
    """A model-checkpoint run dir: longpo_meta.json + a data file (what an identity reads)."""
    d = run / iter_dir_name(iteration)
    d.mkdir(parents=True)
    meta = CheckpointMeta(iteration=iteration, model=model, created="2025-01-01T00:00:00")
    (d / META_FILE).write_text(json.dumps(meta.to_json()))
    (d / "__0_0.distcp").write_bytes(payload)
    (run / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("refcache")
    recs = synthetic_records(6, seed=11)
    w = {"root": root, "recs": recs}
    w["data"] = make_dataset(root / "d" / "train", recs)
    # Same ids, other text: same count, other tokens.
    other_text = [dict(r, turns=[dict(t, chosen=t["chosen"] + " indeed") for t in r["turns"]]) for r in recs]
    w["data_tokens"] = make_dataset(root / "d" / "tokens", other_text)
    # Other ids, same count.
    w["data_ids"] = make_dataset(root / "d" / "ids", [dict(r, id=r["id"] + "-x") for r in recs])
    w["data_fewer"] = make_dataset(root / "d" / "fewer", recs[:4])
    w["ckpt"] = fake_checkpoint(root / "ckptA")
    w["ckpt_b"] = fake_checkpoint(root / "ckptB", payload=b"v" * 100)  # same config, other weights
    return w


def write_fake_cache(path: Path, prefix: str, ckpt: Path, mode: str = "longpo", rope_override=None, identity=None) -> Path:
    """A cache whose meta is built exactly as precompute builds it (values are arbitrary)."""
    ds = PreferenceDataset(prefix)
    n, T = len(ds), num_turn_slots(ds, mode)
    rng = np.random.default_rng(0)
    turns = -rng.uniform(10, 50, size=(n, T, 2))
    for i in range(n):
        turns[i, (1 if mode == "dpo" else int(ds.num_turns[i])):] = np.nan
    counts = np.where(np.isnan(turns), 0, 5).astype(np.int32)
    ck = read_reference_checkpoint(ckpt)
    model = dataclasses.replace(ck.model, rope_theta=rope_override) if rope_override else ck.model
    meta = {
        "mode": mode, "num_samples": n, "max_turns": T,
        "dataset": identity or dataset_identity(load_metadata(prefix), prefix),
        "reference_checkpoint": ck.identity.to_json(), "reference_model": dataclasses.asdict(model),
        "rope_theta_override": rope_override,
    }
    write_cache(path, turns, counts, sum_turns(turns), meta, overwrite=True)
    return path


def run_cfg(cache: Path, mode="longpo", load=None, rope=None) -> LongPOConfig:
    cfg = LongPOConfig()
    cfg.loss.mode = mode
    cfg.reference.cache_path = str(cache)
    cfg.reference.load = None if load is None else str(load)
    cfg.reference.rope_theta = rope
    return cfg


def expect_error(cfg, prefix, *needles, split="train"):
    with pytest.raises(ReferenceCacheError) as e:
        check_reference_cache(cfg, prefix, split)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    # The exact rebuild command: the tool, the dataset, the output, the mode.
    assert "tools/precompute_reference.py" in msg and f"--data {prefix}" in msg, msg
    assert f"--mode {cfg.loss.mode}" in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# A good cache opens; lookups and attach
# ----------------------------------------------------------------------------------------------


def test_good_cache_opens_and_serves_totals(world, tmp_path):
    cache = write_fake_cache(tmp_path / "c", world["data"], world["ckpt"])
    c = check_reference_cache(run_cfg(cache, load=world["ckpt"]), world["data"])
    ds = PreferenceDataset(world["data"])
    src = open_reference(run_cfg(cache, load=world["ckpt"]), ds, groups=None)
    assert isinstance(src, CachedReference)
    idx = [3, 0, 3]
    w, l = src.logps(idx)
    assert w.dtype == torch.float64 and w.shape == (3,)
    expect = np.nansum(np.asarray(c.turns)[idx], axis=1)  # independent sum over turns
    np.testing.assert_allclose(w.numpy(), expect[:, 0], rtol=1e-15)
    np.testing.assert_allclose(l.numpy(), expect[:, 1], rtol=1e-15)
    batch = build_pair_batch([ds[i] for i in (1, 2)], "two_sequences", 8, ds.pad_id)
    batch = src.attach(batch)
    np.testing.assert_array_equal(batch.ref_chosen_logps.numpy(), np.asarray(c.totals)[[1, 2], 0])
    with pytest.raises(IndexError):
        src.logps([len(ds)])
    # The training loop's call form: a dataset prefix, the validation cache via cache_path / split.
    other = write_fake_cache(tmp_path / "v", world["data"], world["ckpt"])
    cfg = run_cfg(tmp_path / "missing")
    cfg.data.train_data, cfg.data.valid_data, cfg.reference.valid_cache_path = "elsewhere", world["data"], str(other)
    v = open_reference(cfg, world["data"], None)  # prefix == data.valid_data -> reference.valid_cache_path
    assert v.cache.path == other and v.description.startswith(f"cache {other}")
    v = open_reference(run_cfg(tmp_path / "missing"), world["data"], None, cache_path=str(other))
    assert v.cache.path == other
    cfg = run_cfg(cache)
    cfg.loss.mode = "sft"
    assert open_reference(cfg, ds, groups=None) is None


def test_write_is_atomic_and_refuses_to_clobber(world, tmp_path):
    cache = write_fake_cache(tmp_path / "c", world["data"], world["ckpt"])
    before = (cache / "meta.json").read_text()
    with pytest.raises(ReferenceCacheError, match="already exists; pass --overwrite"):
        write_cache(cache, np.zeros((1, 1, 2)), np.zeros((1, 1, 2)), np.zeros((1, 2)), {})
    assert (cache / "meta.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp leftovers


# ----------------------------------------------------------------------------------------------
# Every failure case names the mismatch and the rebuild command
# ----------------------------------------------------------------------------------------------


def test_missing_cache(world, tmp_path):
    cache = tmp_path / "nope"
    msg = expect_error(run_cfg(cache, load=world["ckpt"]), world["data"], "does not exist", f"--output {cache}",
                       f"--load {world['ckpt']}")
    assert "--overwrite" not in msg
    (tmp_path / "nope.partial").mkdir()
    expect_error(run_cfg(cache), world["data"], "interrupted precompute", "--load REF_CKPT")


def test_unset_cache_path(world):
    cfg = run_cfg("x")
    cfg.reference.cache_path = None
    expect_error(cfg, world["data"], "needs reference.cache_path")
    cfg.data.valid_data = world["data"]
    expect_error(cfg, world["data"], "needs reference.valid_cache_path", split="valid")


def test_online_source_config_errors_are_config_errors(world):
    """reference.source=online has no cache: its mistakes are ConfigErrors, not cache errors."""
    cfg = run_cfg("unused")
    cfg.reference.source = "online"
    with pytest.raises(ConfigError, match="reference.source=online needs reference.load") as e:
        open_reference(cfg, world["data"], None)
    assert not isinstance(e.value, ReferenceCacheError)
    cfg.reference.source = "disk"
    with pytest.raises(ConfigError, match=r"reference.source='disk' is not one of") as e:
        open_reference(cfg, world["data"], None)
    assert not isinstance(e.value, ReferenceCacheError)


def test_incomplete_or_not_a_cache(world, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    expect_error(run_cfg(d), world["data"], "not a reference cache (no meta.json")
    (d / "meta.json").write_text('{"format": "megatron_longpo.reference_cache", "format_')
    expect_error(run_cfg(d), world["data"], "is corrupt (not valid JSON")
    (d / "meta.json").write_text('{"format": "something_else"}')
    expect_error(run_cfg(d), world["data"], "is not a reference cache (format 'something_else')")
    cache = write_fake_cache(tmp_path / "v", world["data"], world["ckpt"])
    meta = json.loads((cache / "meta.json").read_text())
    meta["format_version"] = 99
    (cache / "meta.json").write_text(json.dumps(meta))
    expect_error(run_cfg(cache), world["data"], "format version 99")


def test_mode_mismatch(world, tmp_path):
    cache = write_fake_cache(tmp_path / "c", world["data"], world["ckpt"], mode="dpo")
    msg = expect_error(run_cfg(cache, mode="longpo"), world["data"],
                       "computed for loss.mode=dpo but this run has loss.mode=longpo")
    assert f"--load {read_reference_checkpoint(world['ckpt']).identity.path}" in msg  # recorded path reused
    # The dpo cache is still valid for dpo runs: never suggest destroying it, suggest a new path.
    fresh = tmp_path / f"{Path(world['data']).name}.longpo.ref_cache"
    assert "--overwrite" not in msg and f"--output {fresh}" in msg and f"reference.cache_path={fresh}" in msg


def test_wrong_sample_count(world, tmp_path):
    cache = write_fake_cache(tmp_path / "c", world["data_fewer"], world["ckpt"])
    expect_error(run_cfg(cache), world["data"], "holds 4 samples but data", "has 6")


def test_other_dataset_ids(world, tmp_path):
    cache = write_fake_cache(tmp_path / "c", world["data_ids"], world["ckpt"])
    msg = expect_error(run_cfg(cache), world["data"], "the sample ids differ", world["data_ids"])
    assert "--overwrite" not in msg and f"--output {cache}" not in msg  # it belongs to another dataset


def test_other_token_content(world, tmp_path):
    cache = write_fake_cache(tmp_path / "c", world["data_tokens"], world["ckpt"])
    expect_error(run_cfg(cache), world["data"], "the token content differs")


def test_other_tokenizer(world, tmp_path):
    meta = load_metadata(world["data"])
    other = dict(meta, tokenizer=dict(meta["tokenizer"], fingerprint="0" * 64))
    cache = write_fake_cache(tmp_path / "c", world["data"], world["ckpt"], identity=dataset_identity(other, world["data"]))
    # Built from this very dataset path, which was re-tokenized since: provably stale, replaced in place.
    expect_error(run_cfg(cache), world["data"], "the tokenizer differs", f"--output {cache}", "--overwrite")


def test_other_reference_checkpoint(world, tmp_path):
    cache = write_fake_cache(tmp_path / "c", world["data"], world["ckpt"])
    b = read_reference_checkpoint(world["ckpt_b"]).identity
    expect_error(run_cfg(cache, load=world["ckpt_b"]), world["data"], "computed from another reference checkpoint",
                 str(read_reference_checkpoint(world["ckpt"]).identity.path), b.path, f"--load {world['ckpt_b']}")
    # Without reference.load the checkpoint cannot be compared: the cache is accepted.
    check_reference_cache(run_cfg(cache), world["data"])


def test_rope_theta_mismatch(world, tmp_path):
    cache = write_fake_cache(tmp_path / "c", world["data"], world["ckpt"])
    expect_error(run_cfg(cache, rope=1e4), world["data"], "reference rope_theta=1000000.0 but reference.rope_theta=10000.0",
                 "--rope-theta 10000.0")
    over = write_fake_cache(tmp_path / "o", world["data"], world["ckpt"], rope_override=1e4)
    check_reference_cache(run_cfg(over, rope=1e4), world["data"])


def test_truncated_missing_and_corrupt_arrays(world, tmp_path):
    cache = write_fake_cache(tmp_path / "c", world["data"], world["ckpt"])
    raw = (cache / "turns.npy").read_bytes()
    (cache / "turns.npy").write_bytes(raw[:-8])
    expect_error(run_cfg(cache), world["data"], "turns.npy is truncated")
    (cache / "turns.npy").write_bytes(raw)
    check_reference_cache(run_cfg(cache), world["data"])
    good = (cache / "totals.npy").read_bytes()
    tot = bytearray(good)
    tot[-3] ^= 0x40  # same size, one flipped bit in a value
    (cache / "totals.npy").write_bytes(bytes(tot))
    expect_error(run_cfg(cache), world["data"], "totals.npy is corrupt (sha256")
    (cache / "totals.npy").write_bytes(good)
    (cache / "counts.npy").unlink()
    expect_error(run_cfg(cache), world["data"], "counts.npy is missing", f"--output {cache}", "--overwrite")


def test_rebuild_command_is_runnable_shape():
    cmd = rebuild_command("/c dir/x", "/data/p", "dpo", "/ck", 1e4)
    assert cmd == ("torchrun --nproc-per-node N tools/precompute_reference.py --load /ck --data /data/p "
                   "--output '/c dir/x' --mode dpo --rope-theta 10000.0")


# ----------------------------------------------------------------------------------------------
# Work items and the batching plan
# ----------------------------------------------------------------------------------------------


def test_items_match_dataset(world):
    ds = PreferenceDataset(world["data"])
    T = num_turn_slots(ds, "longpo")
    assert T == 2 and ds.num_turns.max() == 2 and ds.num_turns.min() == 1
    ids, lengths = item_lengths(ds, "longpo", T)
    assert len(ids) == 2 * int(ds.num_turns.sum())
    seqs = item_sequences(ds, ids, "longpo", T)
    for item, L, (tok, mask) in zip(ids, lengths, seqs):
        i, t, side = split_id(int(item), T)
        ref = ds[i].references[t]
        np.testing.assert_array_equal(tok, ref.chosen if side == 0 else ref.rejected)
        assert L == len(tok) == len(mask)
    ids_d, len_d = item_lengths(ds, "dpo", 1)
    for item, L in zip(ids_d, len_d):
        i, _, side = split_id(int(item), 1)
        assert L == len(ds[i].long_sequences()[side][0])


@pytest.mark.parametrize("budget", [1, 200, 512, 10_000])
def test_plan_covers_every_item_once_within_budget(budget):
    rng = np.random.default_rng(budget)
    ids = rng.permutation(200).astype(np.int64)[:120]
    lengths = rng.integers(5, 300, size=120)
    plan = plan_batches(ids, lengths, budget, 64)
    got = np.concatenate(plan)
    assert sorted(got.tolist()) == sorted(ids.tolist())
    L = dict(zip(ids.tolist(), lengths.tolist()))
    for b in plan:
        rows = padded_length(max(L[int(i)] for i in b), 64)
        assert len(b) == 1 or len(b) * rows <= budget
    # Longest first, and independent of the input order (so of the rank layout).
    firsts = [max(L[int(i)] for i in b) for b in plan]
    assert firsts == sorted(firsts, reverse=True)
    perm = rng.permutation(120)
    again = plan_batches(ids[perm], lengths[perm], budget, 64)
    assert [b.tolist() for b in again] == [b.tolist() for b in plan]


def test_sum_turns_skips_absent_turns():
    v = np.array([[[-1.5, -2.0], [np.nan, np.nan]], [[-1.0, -3.0], [-0.25, -0.5]]])
    np.testing.assert_array_equal(sum_turns(v), [[-1.5, -2.0], [-1.25, -3.5]])


# ----------------------------------------------------------------------------------------------
# Precompute: cheap checks fail before any process group or model
# ----------------------------------------------------------------------------------------------


def test_precompute_rejects_bad_inputs_early(world, tmp_path, monkeypatch):
    import torch.distributed as dist

    opts = dict(load=str(world["ckpt"]), data=world["data"], output=str(tmp_path / "out"), progress=False)
    existing = write_fake_cache(tmp_path / "exists", world["data"], world["ckpt"])
    with pytest.raises(PrecomputeError, match="already exists; pass --overwrite"):
        precompute(PrecomputeOptions(**dict(opts, output=str(existing))))
    with pytest.raises(PrecomputeError, match="must be a multiple of --tp x --pp = 3"):
        precompute(PrecomputeOptions(**dict(opts, tp=3)))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(PrecomputeError, match="cannot run with --tp 4"):  # 2 query groups
        precompute(PrecomputeOptions(**dict(opts, tp=4)))
    # Expert parallelism (--ep): a dense model, experts not divisible, a world size that does not fit.
    with pytest.raises(PrecomputeError, match=r"--ep 2 needs a mixture-of-experts model but the reference model of "
                                              r"--load .* is dense \(model.arch=mistral\); drop --ep"):
        precompute(PrecomputeOptions(**dict(opts, ep=2)))
    moe = fake_checkpoint(tmp_path / "moe", model=dataclasses.replace(REF_MODEL, arch="mixtral", num_experts=4))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(PrecomputeError, match=r"--ep 3 must divide the 4 experts of .*; use one of \[1, 2, 4\]"):
        precompute(PrecomputeOptions(**dict(opts, load=str(moe), ep=3)))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(PrecomputeError, match=r"world size 1 .* must be a multiple of --ep x --etp \(default --tp\) "
                                              r"x --pp = 2x1x1; launch a multiple of 2 processes or lower --ep"):
        precompute(PrecomputeOptions(**dict(opts, load=str(moe), ep=2)))
    with pytest.raises(Exception, match="--load=.* does not exist"):
        precompute(PrecomputeOptions(**dict(opts, load=str(tmp_path / "none"))))
    small = fake_checkpoint(tmp_path / "small", model=dataclasses.replace(REF_MODEL, vocab_size=300))
    with pytest.raises(Exception, match="has 768 tokens but model.vocab_size is 300"):
        precompute(PrecomputeOptions(**dict(opts, load=str(small))))
    pairs = make_dataset(tmp_path / "pairs" / "p", [
        {"id": f"p{i}", "prompt": "Tell me a story.", "chosen": "Once upon a time.", "rejected": "No."} for i in range(3)])
    with pytest.raises(Exception, match="without 'short_prompt'"):
        precompute(PrecomputeOptions(**dict(opts, data=pairs)))
    assert not dist.is_initialized()  # every failure came before any distributed setup


def test_partial_results_state_and_damage(tmp_path):
    plan = [np.array([4, 1]), np.array([0]), np.array([2, 3])]
    pdir = tmp_path / "c.partial"
    key = {"mode": "longpo", "tokens_per_batch": 256, "plan_sha256": "abc"}
    prepare_partial(pdir, key, restart=False)
    prepare_partial(pdir, key, restart=False)  # same settings: resume
    with pytest.raises(PrecomputeError, match=r"other settings \(plan_sha256, tokens_per_batch differ\).*--restart"):
        prepare_partial(pdir, dict(key, tokens_per_batch=512, plan_sha256="x"), restart=False)
    part = pdir / "part-r00000-a.jsonl"
    part.write_text('{"batch": 2, "sums": [-1.25, -3.0000000000000004], "counts": [3, 4]}\n{"batch": 0, "sums": [')
    done = read_parts(pdir, plan)
    assert done == {2: ([-1.25, -3.0000000000000004], [3, 4])}  # exact floats; the torn line is ignored
    part.write_text('{"batch": 2, "sums": [-1.25]}\n')
    with pytest.raises(PrecomputeError, match="damaged line; add --restart"):
        read_parts(pdir, plan)
    part.write_text('{"batch": 1, "sums": [-1.0, -2.0], "counts": [1, 1]}\n')
    with pytest.raises(PrecomputeError, match="batch 1 does not fit the work plan"):
        read_parts(pdir, plan)
    prepare_partial(pdir, dict(key, tokens_per_batch=512), restart=True)
    assert not part.exists()
