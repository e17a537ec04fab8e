"""Reference log-probs: training step time with the cache vs an online reference model, and the
precompute throughput.

    python benchmarks/bench_reference.py [--samples 24 --short-words 60 --ratio 8 --hidden 128 --layers 4]

One CPU process (gloo, world size 1). Synthetic LongPO data whose long document is ``--ratio``
times the short contexts (the script prints the measured token ratio prefix : reference
sequence). A random reference model is saved with the checkpoint module; the policy is the same
architecture with rope_theta 1e7 (as LongPO trains it).
- precompute: tools' code path (reference.precompute.precompute), tokens/s of the forward loop
  (sequence tokens, padding excluded) and of the whole call (model load included).
- training: ``--steps`` timed optimizer steps (after one warm-up) of ``--pairs`` micro-batches of
  one pair each (two_sequences layout); each step = attach reference values + train_step. With
  ``cache`` the values are rows of the memory-mapped cache; with ``online`` the frozen reference
  model runs on every pair's short sequences.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--short-words", type=int, default=60, help="words of each short context")
    ap.add_argument("--ratio", type=int, default=8, help="document words / short-context words")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=2, help="micro-batches (1 pair each) per step")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tokens-per-batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()

    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_longpo.checkpoint import save_model_checkpoint
    from megatron_longpo.config import LongPOConfig, LossConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_longpo.data.indexed import PreferenceDataset
    from megatron_longpo.data.layout import build_pair_batch
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.reference.precompute import PrecomputeOptions, precompute
    from megatron_longpo.reference.source import open_reference
    from megatron_longpo.testing.reference import TOKENIZER_VOCAB, make_dataset, synthetic_records
    from megatron_longpo.runtime.distributed import init_distributed, init_model_parallel, set_seed
    from megatron_longpo.training.optimizer import build_optimizer
    from megatron_longpo.training.step import train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_reference_"))
    recs = synthetic_records(args.samples, seed=0, short_words=(args.short_words, args.short_words), ratio=args.ratio)
    prefix = make_dataset(work / "data" / "train", recs, max_seq_length=1 << 20)
    ds = PreferenceDataset(prefix)
    ref_lens = [len(r.chosen) for i in range(len(ds)) for r in ds[i].references]
    print(f"data: {len(ds)} samples, policy prefix {ds.prefix_lengths.mean():.0f} tokens, reference sequence "
          f"{np.mean(ref_lens):.0f} tokens (prefix : short = {ds.prefix_lengths.mean() / np.mean(ref_lens):.1f} : 1), "
          f"{ds.num_turns.sum()} turns")

    parallel = ParallelConfig()
    init_distributed(parallel)
    groups = init_model_parallel(parallel)
    set_seed(0)
    ref_cfg = ModelConfig(arch="mistral", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=3 * args.hidden,
                          num_attention_heads=8, num_query_groups=2, vocab_size=TOKENIZER_VOCAB,
                          max_position_embeddings=1 << 16, rope_theta=1e6, transformer_impl="local")
    ckpt = work / "ref_ckpt"
    save_model_checkpoint(ckpt, build_model(ref_cfg, parallel), ref_cfg)

    cache = work / "ref_cache"
    res = precompute(PrecomputeOptions(load=str(ckpt), data=prefix, output=str(cache), progress=False,
                                       tokens_per_batch=args.tokens_per_batch), log=lambda _m: None)
    print(f"precompute: {res.tokens_here:,} tokens in {res.batches_here} forwards: {res.tokens_here / res.compute_seconds:,.0f} "
          f"tok/s (forward loop), {res.tokens_here / res.seconds:,.0f} tok/s (whole call incl. model load, {res.seconds:.1f} s)")

    # Both runs live side by side and their steps alternate (order flipped every step), so a change
    # of machine load hits both alike; the median step time is reported.
    runs = {}
    for source in ("cache", "online"):
        cfg = LongPOConfig()
        cfg.model = dataclasses.replace(ref_cfg, rope_theta=1e7)
        cfg.loss = LossConfig(mode="longpo")
        cfg.reference.source, cfg.reference.cache_path, cfg.reference.load = source, str(cache), str(ckpt)
        set_seed(1)
        ref = open_reference(cfg, ds, groups)
        model = build_model(cfg.model, parallel)
        ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=False))
        opt, _ = build_optimizer([ddp], OptimConfig(lr=1e-4, lr_warmup_fraction=0.0), cfg.model, args.steps + 1)
        runs[source] = dict(cfg=cfg, ref=ref, ddp=ddp, opt=opt, times=[], losses=[])
    for step in range(args.steps + 1):
        for source in (("cache", "online") if step % 2 == 0 else ("online", "cache")):
            r = runs[source]
            t0 = time.perf_counter()
            micro = [r["ref"].attach(build_pair_batch([ds[(step * args.pairs + k) % len(ds)]], "two_sequences", 1,
                                                      ds.pad_id)) for k in range(args.pairs)]
            out = train_step(r["ddp"], r["opt"], micro, groups, r["cfg"].loss, r["cfg"].model.vocab_size, False)
            if step:  # the first step warms up allocators and kernels
                r["times"].append(time.perf_counter() - t0)
            r["losses"].append(out.metrics["loss"])
    t_c, t_o = (float(np.median(runs[s]["times"])) for s in ("cache", "online"))
    print(f"training step ({args.pairs} pairs, median of {args.steps}): cache {t_c * 1e3:.0f} ms, online {t_o * 1e3:.0f} ms, "
          f"online / cache = {t_o / t_c:.2f}x")
    diff = max(abs(a - b) for a, b in zip(runs["cache"]["losses"], runs["online"]["losses"]))
    print(f"max |loss(cache) - loss(online)| over {args.steps + 1} steps = {diff:.2e}")
    n_ref = sum(p.numel() for p in runs["online"]["ref"].model.parameters())
    print(f"online keeps a second model: {n_ref:,} parameters ({n_ref * 4 / 2**20:.1f} MiB fp32) that the cache does not need")


if __name__ == "__main__":  # required: dist_checkpointing re-imports __main__ in a helper process
    main()
