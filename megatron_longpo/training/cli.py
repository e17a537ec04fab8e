"""Command lines of ``pretrain_longpo.py`` and ``tools/estimate_memory.py`` (thin wrappers over
:func:`main` and :func:`estimate_memory_main`).

torch-free at the top: ``--help`` and config errors answer in a second, before torch and
megatron-core are imported (tens of seconds on a busy node; tests/e2e/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from megatron_longpo.config import ConfigError, load_config, validate
from megatron_longpo.runtime.signals import die_with_launcher
from megatron_longpo.training.memory_model import (
    GiB,
    cheapest_recompute,
    estimate_memory,
    estimate_step_seconds,
    micro_batches_per_step,
    pipeline_bubble,
    recompute_choices,
    recompute_label,
    tp_collective_bytes,
)


def parse_args(argv: list[str]) -> tuple[Optional[str], list[str]]:
    ap = argparse.ArgumentParser(
        prog="pretrain_longpo.py",
        description="Train an LLM with LongPO (short-to-long preference optimization) on Megatron-Core.",
        epilog="Any option of the config can be overridden as --section.key=value, "
               "e.g. --parallel.tensor_model_parallel_size=2 --training.train_iters=100",
    )
    ap.add_argument("--config", help="YAML config (examples/configs/*.yaml); defaults if omitted")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "." in o.split("=", 1)[0])]
    if bad:
        ap.error(f"unrecognised arguments {bad}; overrides look like --section.key=value")
    return args.config, overrides


def _error(e: BaseException) -> int:
    """One clear line, from rank 0 only (every rank fails the same check), exit code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[longpo] error: {e}", file=sys.stderr, flush=True)
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    """``pretrain_longpo.py``: validate the config, then train (training/loop.py)."""
    config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    die_with_launcher()  # before the long torch import: a killed launcher takes this worker along
    try:
        world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
        validate(load_config(config, overrides), world)
    except ConfigError as e:
        return _error(e)
    # deferred: --help and config errors answer before torch / megatron-core load
    from megatron_longpo.training.loop import main as train_main

    try:
        return train_main(config, overrides)
    except ConfigError as e:  # start-up check (files, caches, checkpoints): no traceback
        return _error(e)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves and stops at a step boundary)
        print("[longpo] interrupted: stopped without saving this step", file=sys.stderr, flush=True)
        return 130


ESTIMATE_DOC = """Per-GPU memory and step-time estimate for a LongPO config (docs/scaling.md).

    python tools/estimate_memory.py --config examples/configs/mistral7b_512k.yaml --world-size 32
"""


def estimate_memory_main(argv: Optional[list[str]] = None) -> int:
    """``tools/estimate_memory.py``: the memory model's table and a step-time estimate."""
    ap = argparse.ArgumentParser(prog="estimate_memory.py", description=ESTIMATE_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--tflops-per-gpu", type=float, default=400.0, help="assumed sustained model TFLOP/s")
    ap.add_argument("--tp-bus-gbps", type=float, default=360.0,
                    help="assumed NVLink bus bandwidth of the TP collectives (GB/s per GPU; H100 NVLink4: ~360 by NCCL tests)")
    ap.add_argument("--recompute", action="store_true",
                    help="also list every activation-recompute choice (memory, step time) and the fastest that fits")
    ap.add_argument("overrides", nargs="*", help="--section.key=value")
    args, extra = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, list(args.overrides) + extra)
        validate(cfg, args.world_size)
    except ConfigError as e:
        print(f"estimate_memory.py: error: {e}", file=sys.stderr)
        return 2
    est = estimate_memory(cfg, args.world_size)
    p = cfg.parallel
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1
    dp = args.world_size // (p.tensor_model_parallel_size * p.context_parallel_size * pp)
    print(f"{args.config}: {est.params / 1e9:.2f}B params, {est.tokens_per_pair} tokens/row, "
          f"tp={p.tensor_model_parallel_size} cp={p.context_parallel_size} pp={pp}"
          f"{f' vpp={vpp}' if vpp > 1 else ''} dp={dp} "
          f"sp={p.sequence_parallel} fp8={p.fp8} layout={cfg.data.pair_layout}")
    print("\n".join(est.lines()))
    headroom = args.gpu_memory_gib - est.total / GiB
    print(f"  {'headroom on a ' + str(int(args.gpu_memory_gib)) + ' GiB GPU':<48s} {headroom:8.2f} GiB"
          + ("   <-- DOES NOT FIT" if headroom < 8 else ""))
    secs = estimate_step_seconds(cfg, args.world_size, args.tflops_per_gpu)
    if pp > 1:
        mb = micro_batches_per_step(cfg, args.world_size)
        print(f"  pipeline bubble: (pp-1)/(vpp*M) = {pp - 1}/({vpp}*{mb}) = "
              f"{pipeline_bubble(pp, vpp, mb):.1%} of the busy time (in the step time below)")
    # Throughput in the unit the LongPO paper reports: chosen + rejected sequence tokens per second.
    tokens = cfg.training.global_batch_size * 2 * est.tokens_per_pair
    print(f"  step time at {args.tflops_per_gpu:.0f} model TFLOP/s/GPU: {secs:.1f} s "
          f"({tokens / secs:,.0f} pair tokens/s over {args.world_size} GPUs)")
    tp_bytes = tp_collective_bytes(cfg, args.world_size)
    print(f"  TP collectives (SP, not overlapped): {tp_bytes / 1e9:,.0f} GB per GPU per step = "
          f"{tp_bytes / (args.tp_bus_gbps * 1e9):.1f} s at {args.tp_bus_gbps:.0f} GB/s (add to the step time)")
    if args.recompute:
        _print_recompute_choices(cfg, args.world_size, args.gpu_memory_gib, args.tflops_per_gpu)
    return 0


def _print_recompute_choices(cfg, world: int, gpu_gib: float, tflops: float) -> None:
    best = cheapest_recompute(cfg, world, gpu_gib)
    print(f"  recompute choices (fastest first; fits = total <= {gpu_gib:.0f} - 8 GiB):")
    for option in recompute_choices(cfg):
        total = estimate_memory(option, world).total / GiB
        mark = "  <-- fastest that fits" if best is not None and recompute_label(option) == recompute_label(best) else ""
        print(f"    {recompute_label(option):<28s} {total:7.2f} GiB  {estimate_step_seconds(option, world, tflops):7.1f} s"
              f"{'' if total <= gpu_gib - 8 else '  (does not fit)'}{mark}")
