"""tools/gpu_check.py: the smoke run (every section at toy size on CPU) and section isolation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from megatron_longpo.checks.gpu_check import (
    ATTN_ATOL,
    SECTIONS,
    SMOKE,
    CheckFailed,
    not_run,
    run_sections,
    summary,
    tolerance_ratio,
)
from megatron_longpo.runtime.capabilities import Capabilities

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


def test_order_and_a_report_after_every_section(tmp_path):
    """The JSON is rewritten after each section, so a run killed later keeps what ran."""
    assert SECTIONS == ("environment", "attention", "loss", "checkpoint", "te", "train")
    seen = []
    funcs = {"environment": lambda: {"a": 1}, "attention": lambda: 1 / 0, "loss": lambda: {}}
    run_sections(["environment", "attention", "loss"], SMOKE, True, 100.0, tmp_path, log=lambda m: None,
                 funcs=funcs, after_each=lambda secs: seen.append([(k, v["status"]) for k, v in secs.items()]))
    assert seen == [[("environment", "ok")], [("environment", "ok"), ("attention", "error")],
                    [("environment", "ok"), ("attention", "error"), ("loss", "ok")]]


def test_attention_tolerance_is_atol_plus_rtol():
    ref = torch.tensor([0.0, 0.5, 5.0, 7.9], dtype=torch.float64)
    assert tolerance_ratio(ref.to(torch.bfloat16), ref) <= 1  # bf16 storage of values up to 8 passes
    assert tolerance_ratio(ref + torch.tensor([2 * ATTN_ATOL, 0, 0, 0], dtype=torch.float64), ref) > 1
    assert tolerance_ratio(ref * 1.05, ref) > 1  # 5% relative error fails at any magnitude


def test_not_run_names_the_missing_production_pieces():
    none = Capabilities(cuda=True, te=False, flash_attn=True, grad_accum_fusion=False, fa3=False)
    text = "\n".join(not_run(none, 1, {"te": {"status": "skipped", "reason": "no TE"}, "loss": {"status": "ok"}}))
    for piece in ("TE layer spec", "TE attention", "FP8", "fused Adam", "fa3", "apex", "more than one GPU", "section te"):
        assert piece in text
    assert "flash-attn 2" not in text and "section loss" not in text


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
    assert all(r["mfu_of_measured_gemm_peak"] > 0 for r in runs.values())
    # new sections: GEMM peak, per-kernel accuracy + TFLOP/s, checkpoint round trip, what did not run
    assert report["sections"]["environment"]["result"]["gemm_peak"]["tflops"] > 0
    kern = att["kernels"]
    assert set(kern["sdpa"]["tflops"]) == {str(t) for t in SMOKE.kernel_tokens} and kern["sdpa"]["max_err_over_tol"] <= 1
    assert all("CUDA" in kern[k]["skipped"] for k in ("flash", "cudnn", "fa3"))
    ck = report["sections"]["checkpoint"]["result"]
    assert ck["weights_bit_exact"] and ck["optimizer_bit_exact"] and ck["rng_bit_exact"] and ck["optimizer_tensors"] > 0
    assert ck["next_step_loss"] == ck["resumed_next_step_loss"] and ck["optimizer_sharding"] == (
        "dp_reshardable" if ck["distributed_optimizer"] else "per_parameter")
    assert report["complete"] and any("Transformer Engine" in x for x in report["not_run"])
    assert summary(report).count("== ") == len(SECTIONS) + 1  # + the not-run list
