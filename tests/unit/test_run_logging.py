"""Run logging: plot_run curves read back exactly and drawn as a PNG; the wandb run id kept per run."""

import json
import subprocess
import sys
from pathlib import Path

from megatron_longpo.training.plot_run import read_curves

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, records, torn=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + ('{"split": "train", "st' if torn else ""))


def _records(scale):
    out = [{"split": "train", "step": s, "loss": scale * s, "nll_loss": 2.0, "lr": 1e-3 * s, "grad_norm": 0.5}
           for s in range(1, 5)]
    out.append({"split": "valid", "step": 4, "loss": 9.0, "nll_loss": 1.0})
    return out


def test_curves_keep_last_value_per_step_and_skip_torn_lines(tmp_path):
    recs = _records(1.0)
    recs.insert(2, {"split": "train", "step": 3, "loss": -1.0})  # from before a resume: replaced below
    _write(tmp_path / "a" / "metrics.jsonl", recs, torn=True)
    c = read_curves(tmp_path / "a")
    assert c.name == "a"
    assert c.train["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert c.valid["loss"] == [(4, 9.0)] and "pref_loss" not in c.train


def test_cli_overlays_runs_into_a_png(tmp_path):
    _write(tmp_path / "a" / "metrics.jsonl", _records(1.0))
    _write(tmp_path / "b" / "metrics.jsonl", _records(2.0))
    out = tmp_path / "curves.png"
    p = subprocess.run([sys.executable, str(ROOT / "tools/plot_run.py"), str(tmp_path / "a"), str(tmp_path / "b"),
                        "--out", str(out), "--names", "longpo", "sft"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    bad = subprocess.run([sys.executable, str(ROOT / "tools/plot_run.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_wandb_run_id_is_kept_per_run_directory(tmp_path):
    from megatron_longpo.training.metrics_log import wandb_run_id

    first = wandb_run_id(None, str(tmp_path / "run"))
    assert first and (tmp_path / "run" / "wandb_run_id").read_text().strip() == first
    assert wandb_run_id(None, str(tmp_path / "run")) == first  # a resumed run continues the same wandb run
    assert wandb_run_id(None, str(tmp_path / "other")) != first
    assert wandb_run_id("given", str(tmp_path / "run")) == "given" and wandb_run_id(None, None) is None
