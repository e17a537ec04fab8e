"""The new families (Qwen3, Qwen3-MoE, Mixtral) through the reference precompute and the online
reference: per-sequence response log-prob sums equal HF transformers in float64.

Fixture: 8 synthetic LongPO records (some with two turns) tokenized with the bundled tokenizer;
per family a tiny random HF model with that vocabulary, converted with the project's converter
(fp32). Independent reference: testing/reference.hf_float64_sums (HF float64, each sequence
alone). Layouts: TP=1 and TP=2 (MoE at TP=2 runs sequence-parallel) through
tools/precompute_reference.py's library entry; CP=2 through the online reference (project CP
attention); MoE also EP=2 (--ep 2), whose cache is bit-identical to EP=1 on 2 ranks (also when
stopped and resumed), over records on which HF's router sends tokens to every expert of every
layer, and the online reference at EP=2 with the two ranks asking for different samples; a
checkpoint saved at EP=2 gives the EP=1 cache bit for bit.
Tolerance as in test_reference_precompute.py: 1e-4 + 1e-6 |value| (fp32 model vs float64).
"""

import json

import numpy as np
import pytest

from megatron_longpo.data.indexed import PreferenceDataset
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.architectures import ARCHITECTURES
from megatron_longpo.testing.reference import (
    hf_expert_counts,
    hf_float64_sums,
    make_dataset,
    reference_items,
    synthetic_records,
)

pytestmark = pytest.mark.distributed

FAMILIES = ["qwen3", "qwen3_moe", "mixtral"]


def _convert(root: str, family: str):
    from megatron_longpo.testing.reference import make_reference_checkpoint

    hf, ckpt = make_reference_checkpoint(root, seed=1, family=family)
    return str(hf), str(ckpt)


def _precompute(kw: dict):
    from megatron_longpo.reference.precompute import PrecomputeOptions, precompute

    r = precompute(PrecomputeOptions(**{"progress": False, "tokens_per_batch": 256, **kw}), log=lambda _m: None)
    return r.complete


def _precompute_stopped_on_rank0(kw: dict, stop_file: str):
    """The stop file seen by rank 0 only: under EP the ranks must still stop after the same batch."""
    import os

    from megatron_longpo.reference.precompute import PrecomputeOptions, precompute
    from megatron_longpo.runtime.signals import STOP_FILE_ENV

    if os.environ["RANK"] == "0":
        os.environ[STOP_FILE_ENV] = stop_file
    try:
        r = precompute(PrecomputeOptions(**{"progress": False, **kw}), log=lambda _m: None)
    finally:
        os.environ.pop(STOP_FILE_ENV, None)
    return r.stopped_by_signal, r.batches_here


def _online_totals(ckpt: str, prefix: str, cp: int):
    from megatron_longpo.config import LongPOConfig
    from megatron_longpo.reference.source import open_reference
    from megatron_longpo.runtime.distributed import init_model_parallel
    from megatron_longpo.testing.models import parallel_config

    cfg = LongPOConfig()
    cfg.parallel = parallel_config(cp=cp, attention_backend="sdpa")
    cfg.reference.source, cfg.reference.load = "online", ckpt
    groups = init_model_parallel(cfg.parallel)
    ds = PreferenceDataset(prefix)
    w, l = open_reference(cfg, ds, groups).logps(list(range(len(ds))))
    return np.stack([w.numpy(), l.numpy()], 1)


def _resave_at_ep2(ckpt: str, out: str) -> None:
    """The checkpoint loaded with the experts split over 2 ranks and saved from there (EP=2 shards)."""
    from megatron_longpo.checkpoint import load_model_checkpoint, read_model_config, save_model_checkpoint
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel
    from megatron_longpo.testing.models import parallel_config

    cfg, parallel = read_model_config(ckpt), parallel_config(ep=2)
    init_model_parallel(parallel)
    model = build_model(cfg, parallel)
    load_model_checkpoint(ckpt, model, cfg)
    save_model_checkpoint(out, model, cfg)


def _online_totals_ep2(ckpt: str, prefix: str):
    """Online reference sums with the experts split over the 2 DP ranks, each rank asking for other
    samples in several forwards (a different number on each: they must still meet in every MoE layer)."""
    from megatron_longpo.config import LongPOConfig
    from megatron_longpo.reference.source import open_reference
    from megatron_longpo.runtime.distributed import init_model_parallel
    from megatron_longpo.testing.models import parallel_config

    cfg = LongPOConfig()
    cfg.parallel = parallel_config(ep=2)
    cfg.reference.source, cfg.reference.load = "online", ckpt
    groups = init_model_parallel(cfg.parallel)
    ds = PreferenceDataset(prefix)
    ref = open_reference(cfg, ds, groups)
    ref.tokens_per_batch = 128  # one or two sequences per forward
    mine = list(range(len(ds))) if groups.dp_rank == 0 else [0]
    w, l = ref.logps(mine)
    return mine, np.stack([w.numpy(), l.numpy()], 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return root, make_dataset(root / "data" / "train", synthetic_records(8, seed=5))


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_logprobs_equal_hf_float64_tp1_tp2_cp2_ep2(family, data):
    root, prefix = data
    hf, ckpt = run_distributed(_convert, 1, args=(str(root), family))[0]
    _, flat, seqs = reference_items(prefix)
    assert sum(len(s[0]) for s in seqs) > 1000
    want = hf_float64_sums(hf, seqs)
    assert np.abs(want).min() > 5
    moe = ARCHITECTURES[family].moe is not None
    # MoE: also the experts split over 2 ranks (--ep 2, loaded from the EP=1 conversion) against
    # EP=1 on as many ranks; 7 batches, so one EP rank runs a filler forward to keep in step.
    odd = dict(tokens_per_batch=384)
    for name, world, kw in [("tp1", 1, {}), ("tp2", 2, dict(tp=2))] + \
            ([("dp2", 2, odd), ("ep2", 2, dict(odd, ep=2))] if moe else []):
        out = root / f"cache-{family}-{name}"
        assert all(run_distributed(_precompute, world, args=(dict(load=ckpt, data=prefix, output=str(out), **kw),)))
        got = np.load(out / "turns.npy").reshape(-1)[flat]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4, err_msg=f"{family} {name}")
    totals = np.load(root / f"cache-{family}-tp1" / "totals.npy")
    if moe:
        counts = hf_expert_counts(hf, seqs)
        assert (counts > 0).all(), f"an expert received no tokens: {counts.tolist()}"
        assert json.loads((root / f"cache-{family}-ep2" / "meta.json").read_text())["compute"]["num_batches"] == 7
        ep1, ep2 = (np.load(root / f"cache-{family}-{n}" / "turns.npy") for n in ("dp2", "ep2"))
        # EP moves tokens, not arithmetic: the same bits as EP=1 on as many ranks (one process
        # instead differs in the last float32 bits through BLAS threading, as DP=2 vs DP=1 does).
        np.testing.assert_array_equal(ep2, ep1)
        # Stopped (the stop file, seen by one rank) after one batch per rank, then resumed: same bits.
        stop, out = root / "STOP", root / f"cache-{family}-ep2-resumed"
        stop.touch()
        kw = dict(load=ckpt, data=prefix, output=str(out), ep=2, **odd)
        assert run_distributed(_precompute_stopped_on_rank0, 2, args=(kw, str(stop))) == [(True, 1), (True, 1)]
        assert all(run_distributed(_precompute, 2, args=(kw,)))
        np.testing.assert_array_equal(np.load(out / "turns.npy"), ep2)
        for mine, got in run_distributed(_online_totals_ep2, 2, args=(ckpt, prefix), timeout=120):
            np.testing.assert_allclose(got, totals[mine], rtol=0, atol=1e-4, err_msg=f"{family} online ep=2")
        # A checkpoint saved at EP=2 through the tools' load path at EP=1: the EP=1 cache, bit for bit.
        run_distributed(_resave_at_ep2, 2, args=(ckpt, str(root / f"ckpt-{family}-ep2")))
        out = root / f"cache-{family}-from-ep2"
        assert all(run_distributed(_precompute, 1, args=(dict(load=str(root / f"ckpt-{family}-ep2"), data=prefix,
                                                              output=str(out)),)))
        np.testing.assert_array_equal(np.load(out / "turns.npy"), np.load(root / f"cache-{family}-tp1" / "turns.npy"))
    for got in run_distributed(_online_totals, 2, args=(ckpt, prefix, 2)):
        np.testing.assert_allclose(got, totals, rtol=0, atol=1e-4, err_msg=f"{family} cp=2")
