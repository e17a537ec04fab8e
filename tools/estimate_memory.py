"""Per-GPU memory and step-time estimate for a LongPO config (docs/scaling.md).

    python tools/estimate_memory.py --config examples/configs/mistral7b_512k.yaml --world-size 32

Logic: megatron_longpo/training/cli.py (estimate_memory_main) over training/memory_model.py.
"""

import sys

from megatron_longpo.training.cli import estimate_memory_main

if __name__ == "__main__":
    sys.exit(estimate_memory_main())
