"""tools/gpu_check.py: the smoke run (every section at toy size on CPU) and section isolation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longpo.checks.gpu_check import SECTIONS, SMOKE, CheckFailed, run_sections, summary

ROOT = Path(__file__).resolve().parents[2]


def test_sections_are_isolated(tmp_path):
    def boom():
        raise ZeroDivisionError("section crashed")

    def fails():
        raise CheckFailed("loss rel err 0.5 (tol 0.01)", {"loss": 1.0})

    ran = []
    funcs = {"environment": boom, "attention": fails, "loss": lambda: ran.append(1) or {"layouts": {}}}
    out = run_sections(["environment", "attention", "loss"], SMOKE, True, 100.0, tmp_path, log=lambda m: None,
                       funcs=funcs)
    assert [out[k]["status"] for k in ("environment", "attention", "loss")] == ["error", "failed", "ok"]
    assert "ZeroDivisionError" in out["environment"]["error"] and ran == [1]
    assert out["attention"]["result"] == {"loss": 1.0}
    skipped = run_sections(["loss"], SMOKE, True, -1.0, tmp_path, log=lambda m: None, funcs=funcs)
    assert skipped["loss"]["status"] == "skipped" and "budget" in skipped["loss"]["reason"]


@pytest.mark.slow
def test_smoke_run_prints_every_section(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["sections"]) == list(SECTIONS)
    for name, sec in report["sections"].items():
        assert f"== {name}: {sec['status']}" in proc.stdout
        if name == "te":  # Transformer Engine needs CUDA
            assert sec["status"] == "skipped"
        else:
            assert sec["status"] == "ok", (name, sec)
    att = report["sections"]["attention"]["result"]
    assert set(att["cp"]) == {"1", "2", "4"}
    loss = report["sections"]["loss"]["result"]["layouts"]
    assert set(loss) == {"two_sequences", "shared_prefix"} and all(v["grad_tensors"] > 10 for v in loss.values())
    runs = report["sections"]["train"]["result"]["runs"]
    assert len(runs) == 4 and all(r["pair_tokens_per_s"] > 0 for r in runs.values())
    assert summary(report).count("== ") == len(SECTIONS)
