#!/usr/bin/env python
"""Plot training curves of one or more runs (overlaid) to a PNG.

    python tools/plot_run.py runs/quickstart [runs/other ...] [--out curves.png] [--names a b]

Logic: megatron_longpo/training/plot_run.py.
"""

import sys

from megatron_longpo.training.plot_run import main

if __name__ == "__main__":
    sys.exit(main())
