"""LongPO training entry point.

    torchrun --nproc-per-node N pretrain_longpo.py --config FILE.yaml [--section.key=value ...]

The command line lives in megatron_longpo/training/cli.py (torch-free: --help and config errors
answer before torch loads), the training in megatron_longpo/training/loop.py; options are
documented in docs/configuration.md.
"""

import sys

from megatron_longpo.training.cli import main

# The guard matters: dist_checkpointing starts spawn-context helpers that re-import __main__.
if __name__ == "__main__":
    sys.exit(main())
