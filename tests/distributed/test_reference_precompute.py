"""Reference precompute on gloo ranks: values, parallel layouts, resume, modes, online == cache.

Fixture: 12 synthetic LongPO samples (4 with two turns) tokenized with the bundled tokenizer, and a
tiny random HF Mistral converted with the project's converter (fp32, rope_theta 1e6). The
independent reference is HF transformers in float64: log_softmax of the full logits of each
sequence alone, summed over response targets (megatron_longpo/testing/reference.hf_float64_sums); it shares no
code with loss/logprobs.py or the Megatron model.

Tolerances (values are sums of ~20-40 log-probs, |value| up to ~250, computed in fp32):
- cache vs float64 HF: |diff| <= 1e-4 + 1e-6 |value|          (fp32 model vs fp64)
- one forward of several padded rows vs each sequence alone: <= 2e-5 (same model, other shapes)
- DP=2 vs DP=1: <= 2e-5 (identical batches; only BLAS threading differs); TP=2 vs TP=1: <= 1e-4
- interrupted + resumed vs uninterrupted, same layout: bit-identical
"""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.data.indexed import PreferenceDataset
from megatron_longpo.testing.reference import (
    hf_float64_sums,
    make_dataset,
    precompute_stopped_on_rank0,
    reference_items,
    synthetic_records,
)
from megatron_longpo.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed

BUDGET = 256  # tokens per batch: 2-4 sequences per forward, ~10 batches


# ----------------------------------------------------------------------------------------------
# Worker functions (module level: run on spawned gloo ranks)
# ----------------------------------------------------------------------------------------------


def _convert(root: str):
    from megatron_longpo.testing.reference import make_reference_checkpoint

    hf, ckpt = make_reference_checkpoint(root, seed=0)
    return str(hf), str(ckpt)


def _precompute(kw: dict):
    """Run the precompute; a ConfigError comes back as a string (keeps the worker pool alive)."""
    from megatron_longpo.config import ConfigError
    from megatron_longpo.reference.precompute import PrecomputeOptions, precompute

    try:
        r = precompute(PrecomputeOptions(**{"progress": False, "tokens_per_batch": BUDGET, **kw}), log=lambda _m: None)
    except ConfigError as e:
        return f"error: {e}"
    return {"complete": r.complete, "total": r.batches_total, "skipped": r.batches_skipped, "here": r.batches_here}


def _batched_vs_single(ckpt: str, prefix: str):
    from megatron_longpo.config import ParallelConfig
    from megatron_longpo.reference.compute import item_lengths, item_sequences, sequence_logprob_sums
    from megatron_longpo.reference.model import load_reference_model, read_reference_checkpoint
    from megatron_longpo.runtime.distributed import init_model_parallel

    parallel = ParallelConfig()
    groups = init_model_parallel(parallel)
    ck = read_reference_checkpoint(ckpt)
    model = load_reference_model(ck, ck.model, parallel)
    ds = PreferenceDataset(prefix)
    ids, _ = item_lengths(ds, "longpo", 2)
    seqs = item_sequences(ds, ids[:9], "longpo", 2)
    kw = dict(vocab_size=ck.model.vocab_size, pad_id=ds.pad_id, pad_to_multiple=64)
    together, counts = sequence_logprob_sums(model, seqs, groups, **kw)
    alone = [sequence_logprob_sums(model, [s], groups, **dict(kw, pad_to_multiple=1))[0][0] for s in seqs]
    return together, np.array(alone), counts, [int(np.sum(m[1:])) for _, m in seqs]


def _save_as_training_checkpoint(ckpt: str, run_dir: str):
    """The reference weights saved by the training loop's checkpointing (optimizer state and all),
    as the reference of a next LongPO iteration would be."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_longpo.config import LongPOConfig, OptimConfig, ParallelConfig, to_dict
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.reference.model import read_reference_checkpoint
    from megatron_longpo.checkpoint import load_model_checkpoint
    from megatron_longpo.runtime.distributed import init_model_parallel
    from megatron_longpo.training.checkpointing import TrainState, save_training_checkpoint
    from megatron_longpo.training.optimizer import build_optimizer

    groups = init_model_parallel(ParallelConfig())
    ck = read_reference_checkpoint(ckpt)
    model = build_model(ck.model, ParallelConfig())
    load_model_checkpoint(ckpt, model, ck.model)
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False))
    opt, sched = build_optimizer([ddp], OptimConfig(lr=1e-3), ck.model, 10)
    cfg = LongPOConfig()
    cfg.model = ck.model
    save_training_checkpoint(run_dir, TrainState(iteration=7, consumed_samples=14), model, opt, sched, to_dict(cfg), groups,
                    ck.model)


def _online_logps(ckpt: str, prefix: str, tp: int, cp: int):
    """Every sample's online reference sums on a TP x CP layout (project CP attention)."""
    from megatron_longpo.config import LongPOConfig
    from megatron_longpo.reference.source import open_reference
    from megatron_longpo.runtime.distributed import init_model_parallel
    from megatron_longpo.testing.models import parallel_config

    cfg = LongPOConfig()
    cfg.parallel = parallel_config(tp=tp, cp=cp, attention_backend="sdpa")
    cfg.reference.source, cfg.reference.load = "online", ckpt
    groups = init_model_parallel(cfg.parallel)
    ds = PreferenceDataset(prefix)
    ref = open_reference(cfg, ds, groups)
    w, l = ref.logps(list(range(len(ds))))
    rw, rl = ref.logps([3, 0, 3])  # repeats and any order
    return w.numpy(), l.numpy(), rw.numpy(), rl.numpy()


def _train_with_reference(ckpt: str, prefix: str, cache: str, source: str, tp: int, steps: int):
    """A few LongPO steps of a policy started from the reference weights (rope_theta 1e7)."""
    import dataclasses

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_longpo.checkpoint import load_model_checkpoint, read_model_config
    from megatron_longpo.config import LongPOConfig, LossConfig, OptimConfig, seq_length_multiple
    from megatron_longpo.data.layout import build_pair_batch
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.sharding import gather_full_state_dict
    from megatron_longpo.reference.source import open_reference
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.testing.models import parallel_config
    from megatron_longpo.training.optimizer import build_optimizer
    from megatron_longpo.training.step import train_step

    cfg = LongPOConfig()
    cfg.model = dataclasses.replace(read_model_config(ckpt), rope_theta=1e7, transformer_impl="local")
    cfg.parallel = parallel_config(tp=tp)
    cfg.loss = LossConfig(mode="longpo", beta=0.5, lam=1.0)  # a visible preference term
    cfg.reference.source, cfg.reference.cache_path, cfg.reference.load = source, cache, ckpt
    groups = init_model_parallel(cfg.parallel)
    set_seed(5)
    ds = PreferenceDataset(prefix)
    ref = open_reference(cfg, ds, groups)  # before the policy: must not disturb its init
    all_w, all_l = ref.logps(list(range(len(ds))))
    model = build_model(cfg.model, cfg.parallel)
    load_model_checkpoint(ckpt, model, cfg.model)
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False))
    opt, _ = build_optimizer([ddp], OptimConfig(lr=1e-3, lr_warmup_fraction=0.0, clip_grad=1.0), cfg.model, steps)
    mult = seq_length_multiple(cfg.parallel)
    out = []
    for step in range(steps):
        micro = [ref.attach(build_pair_batch([ds[(2 * step + k) % len(ds)]], "two_sequences", mult, ds.pad_id))
                 for k in range(2)]
        res = train_step(ddp, opt, micro, groups, cfg.loss, cfg.model.vocab_size, False)
        grads = gather_full_state_dict(model, groups.tp_group, cfg.model.vocab_size, grads=True)
        out.append((res.metrics, {k: v.clone() for k, v in grads.items()}))
    return out, all_w.numpy(), all_l.numpy(), ref.describe()


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("refpre")
    prefix = make_dataset(root / "data" / "train", synthetic_records(12, seed=3))
    hf, ckpt = run_distributed(_convert, 1, args=(str(root),))[0]
    base = root / "cache_dp1"
    r = run_distributed(_precompute, 1, args=(dict(load=ckpt, data=prefix, output=str(base)),))[0]
    assert r["complete"] and r["total"] >= 6, r
    return {"root": root, "prefix": prefix, "hf": hf, "ckpt": ckpt, "base": base}


@pytest.fixture(scope="module")
def dp2(env):
    out = env["root"] / "cache_dp2"
    r = run_distributed(_precompute, 2, args=(dict(load=env["ckpt"], data=env["prefix"], output=str(out)),))[0]
    assert r["complete"], r
    return out


def arrays(cache: Path) -> dict[str, np.ndarray]:
    return {k: np.load(cache / f"{k}.npy") for k in ("turns", "totals", "counts")}


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


def test_cache_equals_float64_forward(env):
    ds, flat, seqs = reference_items(env["prefix"])
    a = arrays(env["base"])
    got = a["turns"].reshape(-1)[flat]
    want = hf_float64_sums(env["hf"], seqs)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
    assert np.abs(want).min() > 5  # non-trivial sums
    # Response-token counts, absent turns, totals.
    np.testing.assert_array_equal(a["counts"].reshape(-1)[flat], [int(np.sum(m[1:])) for _, m in seqs])
    present = np.zeros(a["turns"].size, bool)
    present[flat] = True
    assert np.isnan(a["turns"].reshape(-1)[~present]).all() and (~present).sum() == 2 * (len(ds) * 2 - ds.num_turns.sum())
    np.testing.assert_allclose(a["totals"], np.nansum(a["turns"], axis=1), rtol=1e-14)
    meta = json.loads((env["base"] / "meta.json").read_text())
    assert meta["mode"] == "longpo" and meta["num_samples"] == len(ds) and meta["max_turns"] == 2
    assert meta["reference_model"]["rope_theta"] == 1e6  # the checkpoint's own RoPE base
    assert meta["reference_checkpoint"]["iteration"] == 0
    assert not (env["root"] / "cache_dp1.partial").exists()


def test_one_forward_of_padded_rows_equals_each_sequence_alone(env):
    together, alone, counts, want_counts = run_distributed(_batched_vs_single, 1, args=(env["ckpt"], env["prefix"]))[0]
    np.testing.assert_allclose(together, alone, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(counts, want_counts)


def test_dp2_and_tp2_equal_dp1(env, dp2):
    base = arrays(env["base"])
    for k, v in arrays(dp2).items():
        np.testing.assert_allclose(v, base[k], rtol=0, atol=2e-5, err_msg=f"DP=2 {k}")
    tp2 = env["root"] / "cache_tp2"
    r = run_distributed(_precompute, 2, args=(dict(load=env["ckpt"], data=env["prefix"], output=str(tp2), tp=2),))[0]
    assert r["complete"]
    for k, v in arrays(tp2).items():
        np.testing.assert_allclose(v, base[k], rtol=0, atol=1e-4, err_msg=f"TP=2 {k}")
    assert json.loads((tp2 / "meta.json").read_text())["compute"]["tp"] == 2


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------


def test_interrupted_and_resumed_equals_uninterrupted(env, dp2):
    out = env["root"] / "cache_resumed"
    kw = dict(load=env["ckpt"], data=env["prefix"], output=str(out))
    r1 = run_distributed(_precompute, 2, args=(dict(kw, stop_after_batches=2),))[0]
    assert not r1["complete"] and not out.exists()
    partial = Path(str(out) + ".partial")
    parts = sorted(partial.glob("part-*.jsonl"))
    assert len(parts) == 2 and all(len(p.read_text().splitlines()) == 2 for p in parts)
    with open(parts[0], "a") as f:  # the line a killed process was writing
        f.write('{"batch": 3, "sums": [-12.5, ')
    r2 = run_distributed(_precompute, 2, args=(kw,))[0]
    assert r2["complete"] and r2["skipped"] == 4 and r2["total"] - 4 > 0, r2
    assert not partial.exists()
    want, got = arrays(dp2), arrays(out)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # bit-identical
    m1, m2 = (json.loads((p / "meta.json").read_text()) for p in (dp2, out))
    for key in ("dataset", "reference_checkpoint", "reference_model", "files"):
        assert m1[key] == m2[key], key


def test_stop_seen_by_one_tp_rank_stops_the_replica(env):
    """Under TP=2 a stop file seen by rank 0 only stops both ranks after the same batch (before,
    rank 1 went on into the next forward and waited in its TP collective until the timeout)."""
    stop, out = env["root"] / "STOP_tp2", env["root"] / "cache_tp2_stopped"
    stop.touch()
    kw = dict(load=env["ckpt"], data=env["prefix"], output=str(out), tp=2, tokens_per_batch=256)
    assert run_distributed(precompute_stopped_on_rank0, 2, args=(kw, str(stop))) == [(True, 1), (True, 1)]
    assert not out.exists() and Path(str(out) + ".partial").is_dir()


def test_resume_on_another_world_size_and_refusals(env):
    out = env["root"] / "cache_cross"
    kw = dict(load=env["ckpt"], data=env["prefix"], output=str(out))
    assert not run_distributed(_precompute, 1, args=(dict(kw, stop_after_batches=3),))[0]["complete"]
    msg = run_distributed(_precompute, 1, args=(dict(kw, tokens_per_batch=512),))
    assert isinstance(msg[0], str) and "holds an interrupted precompute with other settings" in msg[0], msg
    assert "tokens_per_batch" in msg[0] and "--restart" in msg[0]
    r = run_distributed(_precompute, 2, args=(kw,))[0]  # resumed on 2 ranks
    assert r["complete"] and r["skipped"] == 3
    base = arrays(env["base"])
    for k, v in arrays(out).items():
        np.testing.assert_allclose(v, base[k], rtol=0, atol=2e-5, err_msg=k)
    msg = run_distributed(_precompute, 1, args=(kw,))[0]
    assert "already exists; pass --overwrite" in msg
    # --restart discards partial results; --overwrite replaces the finished cache.
    assert not run_distributed(_precompute, 1, args=(dict(kw, overwrite=True, stop_after_batches=1),))[0]["complete"]
    assert (out / "meta.json").exists()  # the old cache stays until a new one is complete
    r = run_distributed(_precompute, 1, args=(dict(kw, overwrite=True, restart=True),))[0]
    assert r["complete"] and r["skipped"] == 0


def test_training_checkpoint_as_reference(env):
    run = env["root"] / "train_run"
    run_distributed(_save_as_training_checkpoint, 1, args=(env["ckpt"], str(run)))
    out = env["root"] / "cache_from_training_ckpt"
    r = run_distributed(_precompute, 1, args=(dict(load=str(run), data=env["prefix"], output=str(out)),))[0]
    assert r["complete"], r
    base = arrays(env["base"])
    for k, v in arrays(out).items():
        np.testing.assert_array_equal(v, base[k], err_msg=k)  # same weights, same batches
    ck = json.loads((out / "meta.json").read_text())["reference_checkpoint"]
    assert ck["iteration"] == 7 and ck["path"].endswith("iter_0000007")


def test_online_reference_under_context_parallel(env):
    w, l, rw, rl = run_distributed(_online_logps, 2, args=(env["ckpt"], env["prefix"], 1, 2))[0]
    totals = arrays(env["base"])["totals"]
    np.testing.assert_allclose(w, totals[:, 0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(l, totals[:, 1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(rw, totals[[3, 0, 3], 0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(rl, totals[[3, 0, 3], 1], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Modes and overrides
# ----------------------------------------------------------------------------------------------


def test_dpo_mode_uses_long_sequences(env):
    out = env["root"] / "cache_dpo"
    r = run_distributed(_precompute, 1, args=(dict(load=env["ckpt"], data=env["prefix"], output=str(out), mode="dpo"),))[0]
    assert r["complete"]
    ds = PreferenceDataset(env["prefix"])
    seqs = [s for i in range(len(ds)) for s in ds[i].long_sequences()]
    a = arrays(out)
    assert a["turns"].shape == (len(ds), 1, 2)
    np.testing.assert_allclose(a["totals"].reshape(-1), hf_float64_sums(env["hf"], seqs), rtol=1e-6, atol=2e-4)
    assert json.loads((out / "meta.json").read_text())["mode"] == "dpo"


def test_rope_theta_override(env):
    out = env["root"] / "cache_rope"
    r = run_distributed(_precompute, 1, args=(dict(load=env["ckpt"], data=env["prefix"], output=str(out), rope_theta=1e4),))[0]
    assert r["complete"]
    _, flat, seqs = reference_items(env["prefix"])
    got = arrays(out)["turns"].reshape(-1)[flat]
    np.testing.assert_allclose(got, hf_float64_sums(env["hf"], seqs, rope_theta=1e4), rtol=1e-6, atol=1e-4)
    assert np.abs(got - arrays(env["base"])["turns"].reshape(-1)[flat]).max() > 1e-2  # the override matters
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rope_theta_override"] == 1e4 and meta["reference_model"]["rope_theta"] == 1e4


# ----------------------------------------------------------------------------------------------
# Training: cache and online give the same loss and gradients
# ----------------------------------------------------------------------------------------------


def test_cache_and_online_same_loss_and_grads(env):
    steps = 3
    args = (env["ckpt"], env["prefix"], str(env["base"]))
    cached, w_c, l_c, desc_c = run_distributed(_train_with_reference, 2, args=args + ("cache", 2, steps))[0]
    online, w_o, l_o, desc_o = run_distributed(_train_with_reference, 2, args=args + ("online", 2, steps))[0]
    assert desc_c.startswith("cache ") and "rope_theta=1000000.0" in desc_o  # reference keeps its own RoPE base
    # The online reference (TP=2) reproduces the cache (TP=1) for every sample.
    np.testing.assert_allclose(w_o, w_c, rtol=0, atol=1e-4)
    np.testing.assert_allclose(l_o, l_c, rtol=0, atol=1e-4)
    for step, ((mc, gc), (mo, go)) in enumerate(zip(cached, online)):
        for k in ("loss", "pref_loss", "nll_loss", "logps/ref_chosen", "logps/ref_rejected", "rewards/margins"):
            assert abs(mc[k] - mo[k]) <= 1e-5 * max(1.0, abs(mc[k])), (step, k, mc[k], mo[k])
        samples = [(2 * step + k) % len(w_c) for k in range(2)]  # the cached values reached the loss
        assert abs(mc["logps/ref_chosen"] - w_c[samples].mean()) <= 1e-9 * abs(w_c[samples].mean())
        assert abs(mc["logps/ref_rejected"] - l_c[samples].mean()) <= 1e-9 * abs(l_c[samples].mean())
        for name in gc:
            scale = max(float(gc[name].abs().max()), 1e-6)
            diff = float((gc[name] - go[name]).abs().max())
            assert diff <= 1e-4 * scale + 1e-7, (step, name, diff, scale)
