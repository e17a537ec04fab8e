"""Evaluation outputs: the results JSON and the accuracy-vs-length PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from megatron_longpo.config import ConfigError
from megatron_longpo.fsutil import write_text_atomic

FORMAT_NAME = "megatron_longpo.evaluation"
FORMAT_VERSION = 1


def results_document(suite: dict, parallel: dict, checkpoints: Sequence[dict]) -> dict:
    """The JSON document: suite definition, parallel layout, one entry per checkpoint."""
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "suite": suite, "parallel": parallel,
            "checkpoints": list(checkpoints)}


def write_results(path: str | Path, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")


def require_matplotlib():
    """The matplotlib module, or a ConfigError saying how to install it (checked before any work)."""
    try:  # optional dependency: pip install 'megatron_longpo[plot]'
        import matplotlib  # optional: matplotlib is the 'plot' extra
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib: pip install 'megatron_longpo[plot]' (or matplotlib)") from e
    return matplotlib


def plot_accuracy(doc: dict, path: str | Path) -> None:
    """Accuracy vs length, one line per checkpoint (error bars: 95% Wilson intervals): one panel per
    task plus the mean over tasks."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: matplotlib is the 'plot' extra

    ckpts = doc["checkpoints"]
    tasks = list(doc["suite"]["tasks"]) + ["mean"]
    cols = min(len(tasks), 4)
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for k, task in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        for c in ckpts:
            by = c["mean_accuracy"] if task == "mean" else {n: v["accuracy"] for n, v in c["results"][task].items()}
            xs = sorted(by, key=int)
            ys = [100 * by[x] for x in xs]
            if task == "mean":
                ax.plot([int(x) for x in xs], ys, marker="o", label=c["label"])
            else:  # the 95% Wilson interval of each accuracy as an error bar
                ci = [c["results"][task][x]["accuracy_ci"] for x in xs]
                err = [[y - 100 * lo for y, (lo, _) in zip(ys, ci)], [100 * hi - y for y, (_, hi) in zip(ys, ci)]]
                ax.errorbar([int(x) for x in xs], ys, yerr=err, marker="o", capsize=3, label=c["label"])
        ax.set_xscale("log", base=2)
        ticks = sorted({int(n) for c in ckpts for n in c["mean_accuracy"]})
        ax.set_xticks(ticks, [f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n) for n in ticks])
        ax.minorticks_off()
        ax.set_ylim(-5, 105)
        ax.set_title(task if task != "mean" else "mean over tasks")
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("exact match (%)")
        ax.grid(alpha=0.3)
    for k in range(len(tasks), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
