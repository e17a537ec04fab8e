"""Training curves of one or more runs from their metrics JSONL (``logging.metrics_jsonl``) as a PNG.

The panels are the ones a LongPO run is judged by: total loss, NLL, preference loss,
rewards/margins, rewards/accuracies, learning rate and gradient norm against the step; several
runs are overlaid (one colour each, validation points as markers). matplotlib is an optional
dependency (``pip install 'megatron_longpo[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

PANELS = (
    ("loss", "loss"), ("nll_loss", "NLL"), ("pref_loss", "preference loss"), ("rewards/margins", "rewards/margins"),
    ("rewards/accuracies", "rewards/accuracies"), ("lr", "learning rate"), ("grad_norm", "grad norm"),
)
METRICS_FILE = "metrics.jsonl"


@dataclass
class RunCurves:
    name: str
    train: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)]
    valid: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def find_metrics(path: str | Path) -> Path:
    """``path`` itself (a JSONL file) or the metrics file of a run directory (searched 2 levels down)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for cand in [p / METRICS_FILE, *sorted(p.glob(f"*/{METRICS_FILE}")), *sorted(p.glob(f"*/*/{METRICS_FILE}"))]:
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"{p}: no {METRICS_FILE} in it or two levels below; pass the file set as "
                                "logging.metrics_jsonl")
    raise FileNotFoundError(f"{p} does not exist")


def read_curves(path: str | Path, name: str | None = None) -> RunCurves:
    """Curves of one metrics JSONL; a step logged twice (an older file from before a resume) keeps
    its last value. Malformed lines are skipped (a killed run may leave a torn last line)."""
    f = find_metrics(path)
    run = RunCurves(name or (f.parent.name if f.name == METRICS_FILE else f.stem))
    latest: dict[tuple[str, str, int], float] = {}
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        split, step = rec.get("split", "train"), rec.get("step")
        if not isinstance(step, int):
            continue
        for key, _ in PANELS:
            v = rec.get(key)
            if isinstance(v, (int, float)):
                latest[(split, key, step)] = float(v)
    for (split, key, step), v in sorted(latest.items(), key=lambda kv: kv[0][2]):
        (run.valid if split == "valid" else run.train).setdefault(key, []).append((step, v))
    return run


def plot_runs(runs: Sequence[RunCurves], out: str | Path) -> Path:
    """Write the PNG (one panel per metric any run has) and return its path."""
    import matplotlib  # optional: matplotlib is the 'plot' extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: matplotlib is the 'plot' extra

    keys = [(k, t) for k, t in PANELS if any(k in r.train or k in r.valid for r in runs)]
    if not keys:
        raise ValueError("no plottable metric (loss, nll_loss, ...) in the given runs")
    cols = 2
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, keys):
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            if key in run.train:
                s, v = zip(*run.train[key])
                ax.plot(s, v, color=color, label=run.name, linewidth=1.2)
            if key in run.valid:
                s, v = zip(*run.valid[key])
                ax.plot(s, v, color=color, marker="o", linestyle="--", label=f"{run.name} (valid)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


USAGE = """Plot training curves of one or more runs (overlaid) to a PNG.

    python tools/plot_run.py runs/quickstart [runs/other ...] [--out curves.png] [--names a b]

Each RUN is a metrics JSONL (logging.metrics_jsonl) or a directory holding ``metrics.jsonl``.
For live curves use TensorBoard: ``tensorboard --logdir <logging.tensorboard_dir>``.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/plot_run.py``."""
    p = argparse.ArgumentParser(prog="plot_run.py", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
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
