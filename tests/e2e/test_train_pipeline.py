"""pretrain_longpo.py with pipeline parallelism end to end (torchrun, gloo): the HF-converted base
trains with ``--parallel.pipeline_model_parallel_size=2``; a checkpoint saved with PP=2 resumes
with PP=1 x TP=2 and the other way round, continuing exactly like the uninterrupted PP=1 run; the
PP=2-saved checkpoint exports to HF with the same weights as the PP=1 run; the reference cache
computed with ``--pp 2`` equals the PP=1 one."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_longpo.testing.e2e import PY, prepare_quickstart, read_metrics, run_cli, torchrun, train_overrides

pytestmark = pytest.mark.slow

PP2 = {"parallel.tensor_model_parallel_size": 1, "parallel.pipeline_model_parallel_size": 2}
TP2 = {"parallel.tensor_model_parallel_size": 2}
STEPS = {"training.train_iters": 6, "checkpoint.save_interval": 100}
KEYS = ("loss", "nll_loss", "pref_loss", "rewards/margins", "rewards/accuracies", "lr", "grad_norm")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_quickstart(tmp_path_factory.mktemp("quickstart_pp"))


def _train(d, run, steps=STEPS, **extra):
    return run_cli(torchrun(2, "pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml",
                            *train_overrides(d, run, **steps, **extra)))


def _steps(d, run):
    return [m for m in read_metrics(d, run) if m["split"] == "train"]


def _export(d, run) -> dict[str, torch.Tensor]:
    """The HF safetensors weights tools/convert_megatron_to_hf.py writes for the run's last checkpoint."""
    out = d / f"hf_{run}"
    run_cli([PY, "tools/convert_megatron_to_hf.py", "--megatron-dir", d / run / "ckpt", "--out", out, "--dtype", "fp32",
             "--no-progress"])
    weights = {}
    for f in sorted(out.glob("*.safetensors")):
        weights.update(load_file(f))
    return weights


def test_pipeline_resume_across_layouts_and_export(prepared):
    d = prepared
    _train(d, "full", **TP2)  # the uninterrupted PP=1 reference
    for first, second, run in ((PP2, TP2, "pp_to_tp"), (TP2, PP2, "tp_to_pp")):
        p1 = _train(d, run, **first, **{"training.exit_interval": 3})
        assert "stopping at step 3 (exit_interval)" in p1.stdout
        p2 = _train(d, run, **second)
        assert "resumed from" in p2.stdout and "at step 3" in p2.stdout
    assert "pp=2" in p2.stdout  # tp_to_pp's second run is pipelined
    full = _steps(d, "full")
    for run in ("pp_to_tp", "tp_to_pp"):
        got = _steps(d, run)
        assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
        for a, b in zip(full, got):
            for k in KEYS:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (run, a["step"], k, a[k], b[k])
    # tp_to_pp's last checkpoint was saved by the PP=2 run: its export equals the PP=1 run's.
    wa, wb = _export(d, "full"), _export(d, "tp_to_pp")
    assert wa and set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_precompute_with_pp2_equals_pp1(prepared):
    """tools/precompute_reference.py --pp 2 (forward-only pipeline schedule) writes the cache the
    fixture wrote with PP=1 (2 data-parallel ranks)."""
    d = prepared
    run_cli(torchrun(2, "tools/precompute_reference.py", "--load", d / "base", "--data", d / "data/train",
                     "--output", d / "ref_cache_pp2", "--mode", "longpo", "--pp", "2", "--no-progress"))
    for name in ("turns", "counts", "totals"):
        a, b = np.load(d / "ref_cache" / f"{name}.npy"), np.load(d / "ref_cache_pp2" / f"{name}.npy")
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9, err_msg=name)  # NaN (no such turn) in the same places


def test_four_layers_pp2_and_vpp2_export_equals_pp1(prepared):
    """A 4-layer model trained 3 steps with PP=2 (1F1B) and with PP=2 x VPP=2 (interleaved, set on
    the command line), each exported to HF, equals the PP=1 (TP=2) run weight by weight. Its
    reference cache is computed with --pp 2."""
    d = prepared
    run_cli([PY, "examples/make_tiny_base_model.py", "--out", d / "hf_base4", "--layers", "4"])
    run_cli([PY, "tools/convert_hf_to_megatron.py", "--hf-dir", d / "hf_base4", "--out", d / "base4", "--dtype", "fp32",
             "--no-progress"])
    run_cli(torchrun(2, "tools/precompute_reference.py", "--load", d / "base4", "--data", d / "data/train",
                     "--output", d / "ref_cache4", "--mode", "longpo", "--pp", "2", "--no-progress"))
    four = {"model.num_layers": 4, "reference.cache_path": d / "ref_cache4", "reference.load": d / "base4",
            "checkpoint.load": d / "base4"}
    steps = {"training.train_iters": 3, "checkpoint.save_interval": 100}
    _train(d, "four_tp2", steps, **four, **TP2)
    p = _train(d, "four_vpp", steps, **four, **PP2, **{"parallel.virtual_pipeline_model_parallel_size": 2})
    assert "pp=2x2 (vpp)" in p.stdout
    _train(d, "four_pp2", steps, **four, **PP2)
    ref = _steps(d, "four_tp2")
    want = _export(d, "four_tp2")
    assert len(want) == 4 * 9 + 3  # 4 layers of 9 tensors + embedding, final norm, lm_head
    for run in ("four_pp2", "four_vpp"):
        for a, b in zip(ref, _steps(d, run)):
            for k in KEYS:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (run, a["step"], k, a[k], b[k])
        got = _export(d, run)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{run} {k}: {m}")
