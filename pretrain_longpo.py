"""LongPO training entry point.

    torchrun --nproc-per-node N pretrain_longpo.py --config FILE.yaml [--section.key=value ...]

All logic lives in megatron_longpo.training.loop; options are documented in docs/configuration.md.
"""

import argparse
import os
import sys

# Light imports only above main(): --help and config errors answer in a second, before torch and
# megatron-core are imported (tens of seconds on a busy node).
from megatron_longpo.config import ConfigError, load_config, validate


def parse_args(argv):
    ap = argparse.ArgumentParser(
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


def main(argv=None) -> int:
    config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
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


# The guard matters: dist_checkpointing starts spawn-context helpers that re-import __main__.
if __name__ == "__main__":
    sys.exit(main())
