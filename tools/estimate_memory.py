"""Per-GPU memory and step-time estimate for a LongPO config (docs/scaling.md).

    python tools/estimate_memory.py --config examples/configs/mistral7b_512k.yaml --world-size 32
"""

import argparse
import sys

from megatron_longpo.config import ConfigError, load_config, validate
from megatron_longpo.training.memory_model import GiB, estimate_memory, estimate_step_seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--tflops-per-gpu", type=float, default=400.0, help="assumed sustained model TFLOP/s")
    ap.add_argument("overrides", nargs="*", help="--section.key=value")
    args, extra = ap.parse_known_args()
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


if __name__ == "__main__":
    sys.exit(main())
