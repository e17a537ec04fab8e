#!/usr/bin/env python
"""Compute the reference log-prob cache of a preprocessed dataset (see docs/reference_cache.md).

    torchrun --nproc-per-node N tools/precompute_reference.py --load REF_CKPT --data PREFIX \
        --output CACHE [--mode longpo|dpo] [--tp K] [--pp K] [--tokens-per-batch T] [--overwrite] [--restart]

An interrupted run continues where it stopped when started again with the same options.
"""

import sys

from megatron_longpo.reference.precompute_args import build_arg_parser

# The guard is required: dist_checkpointing starts a spawn-context helper that re-imports __main__.
if __name__ == "__main__":
    build_arg_parser().parse_args()  # --help / option errors answer before torch is imported
    from megatron_longpo.reference.precompute import main

    sys.exit(main())
