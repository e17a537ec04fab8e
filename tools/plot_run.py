#!/usr/bin/env python
"""Plot training curves of one or more runs (overlaid) to a PNG.

    python tools/plot_run.py runs/quickstart [runs/other ...] [--out curves.png] [--names a b]

Each RUN is a metrics JSONL (logging.metrics_jsonl) or a directory holding ``metrics.jsonl``.
For live curves use TensorBoard: ``tensorboard --logdir <logging.tensorboard_dir>``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_longpo.training.plot_run import find_metrics, plot_runs, read_curves


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="metrics JSONL files or run directories")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/curves.png of the first run)")
    p.add_argument("--names", nargs="*", default=None, help="legend names, one per run")
    a = p.parse_args(argv)
    if a.names and len(a.names) != len(a.runs):
        p.error(f"--names has {len(a.names)} names for {len(a.runs)} runs")
    try:
        runs = [read_curves(r, a.names[i] if a.names else None) for i, r in enumerate(a.runs)]
        out = a.out or str(find_metrics(a.runs[0]).parent / "curves.png")
        print(f"wrote {plot_runs(runs, out)}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: plotting needs matplotlib: pip install 'megatron_longpo[plot]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
