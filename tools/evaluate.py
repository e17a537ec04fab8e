#!/usr/bin/env python
"""Score Megatron checkpoints on synthetic long-context tasks (see docs/evaluation.md).

    torchrun --nproc-per-node N tools/evaluate.py --load CKPT [CKPT ...] --tasks niah_single,kv_retrieval \
        --lengths 4096,128k [--samples 8] [--tp K] [--cp K] [--pp K] --output results.json [--plot results.png]
"""

import sys

from megatron_longpo.evaluation.args import build_arg_parser

# The guard is required: dist_checkpointing starts a spawn-context helper that re-imports __main__.
if __name__ == "__main__":
    build_arg_parser().parse_args()  # --help / option errors answer before torch is imported
    from megatron_longpo.evaluation.cli import main

    sys.exit(main())
