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
from megatron_longpo.training.memory_model import GiB, estimate_memory, estimate_step_seconds


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
    dp = args.world_size // (p.tensor_model_parallel_size * p.context_parallel_size)
    print(f"{args.config}: {est.params / 1e9:.2f}B params, {est.tokens_per_pair} tokens/row, "
          f"tp={p.tensor_model_parallel_size} cp={p.context_parallel_size} dp={dp} "
          f"sp={p.sequence_parallel} fp8={p.fp8} layout={cfg.data.pair_layout}")
    print("\n".join(est.lines()))
    headroom = args.gpu_memory_gib - est.total / GiB
    print(f"  {'headroom on a ' + str(int(args.gpu_memory_gib)) + ' GiB GPU':<48s} {headroom:8.2f} GiB"
          + ("   <-- DOES NOT FIT" if headroom < 8 else ""))
    secs = estimate_step_seconds(cfg, args.world_size, args.tflops_per_gpu)
    # Throughput in the unit the LongPO paper reports: chosen + rejected sequence tokens per second.
    tokens = cfg.training.global_batch_size * 2 * est.tokens_per_pair
    print(f"  step time at {args.tflops_per_gpu:.0f} model TFLOP/s/GPU: {secs:.1f} s "
          f"({tokens / secs:,.0f} pair tokens/s over {args.world_size} GPUs)")
    return 0
