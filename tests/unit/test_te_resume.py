"""Defect: FP8 (delayed) runs could not resume with the TE pip installs of the day.

setup.py now pins transformer-engine to megatron-core 0.16.1's own range, and a TE that refuses
pickled FP8 state (>= 2.16.1) either loads the run's own checkpoints (opt-in for that load only)
or stops with one line naming the fixes.
"""

import io
import os
import pickle
import runpy
from pathlib import Path
from unittest import mock

import pytest
import torch
from packaging.requirements import Requirement

from megatron_longpo import gpu_rules
from megatron_longpo.config import ConfigError, ParallelConfig
from megatron_longpo.runtime.te_state import FP8StateRefused, loading_te_extra_state

ROOT = Path(__file__).resolve().parents[2]
# TE 2.16.1+ transformer_engine/pytorch/module/_extra_state.py: the advisory it raises, verbatim start
TE_ADVISORY = ("Refusing to load pickled Transformer Engine extra state for {}. Delayed-scaling FP8 metadata can "
               "be stored as a Python pickle, and loading it can execute arbitrary code.")


def _extras() -> dict:
    with mock.patch("setuptools.setup") as setup:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return setup.call_args.kwargs["extras_require"]


def test_setup_pins_te_to_megatron_core_range():
    extras = _extras()
    te = [Requirement(r) for r in extras["gpu"] if Requirement(r).name == "transformer-engine"]
    assert len(te) == 1 and "pytorch" in te[0].extras
    # megatron-core 0.16.1 pyproject.toml (extra dev): transformer-engine[...]>=2.9.0a0,<2.12.0
    assert str(te[0].specifier) == str(Requirement(f"x{gpu_rules.TE_SUPPORTED}").specifier)
    assert "2.11.0" in te[0].specifier and "2.18.0" not in te[0].specifier and "2.12.0" not in te[0].specifier
    # flash-attn has its own extra (no wheel for new torch/CUDA: hours of compilation)
    assert not any(Requirement(r).name == "flash-attn" for r in extras["gpu"])
    assert any(Requirement(r).name == "flash-attn" for r in extras["flash"])


@pytest.mark.parametrize("version,supported,refuses", [
    ("2.9.0", True, False), ("2.11.0", True, False), ("2.10.0a0+git1234", True, False), ("2.12.0", False, False),
    ("2.16.0", False, False), ("2.16.1", False, True), ("2.18.0", False, True), ("2.8.0", False, False),
])
def test_te_version_rules(version, supported, refuses):
    assert gpu_rules.te_version_supported(version) is supported
    assert gpu_rules.te_refuses_pickled_state(version) is refuses
    notes = gpu_rules.te_version_notes(version, ParallelConfig(fp8="hybrid", fp8_recipe="delayed"))
    assert len(notes) == (not supported) + refuses
    # a recipe without pickled state (tensorwise) resumes on any TE: only the range note remains
    assert len(gpu_rules.te_version_notes(version, ParallelConfig(fp8="hybrid", fp8_recipe="tensorwise"))) == (not supported)


class _TE216Linear(torch.nn.Module):
    """A module whose extra state behaves like TE >= 2.16.1 with the delayed recipe: saved as a
    pickle in a uint8 tensor, refused on load unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.scale = 1.0

    def get_extra_state(self):
        buf = io.BytesIO()
        pickle.dump({"recipe": "DelayedScaling", "scale_fwd": self.scale}, buf)
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state):
        if os.getenv("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", "0") != "1":
            raise RuntimeError(TE_ADVISORY.format("_TE216Linear") + " To load it anyway, set "
                               "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1.")
        self.scale = pickle.loads(state.numpy().tobytes())["scale_fwd"]


def test_own_checkpoint_resumes_and_env_is_restored(monkeypatch):
    monkeypatch.delenv("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", raising=False)
    src = _TE216Linear()
    src.scale = 3.5
    state = src.state_dict()
    dst = _TE216Linear()
    with pytest.raises(RuntimeError, match="Refusing to load pickled"):  # the defect, reproduced
        dst.load_state_dict(state)
    with loading_te_extra_state("run/iter_0000002", trusted=True):
        dst.load_state_dict(state)
    assert dst.scale == 3.5 and "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE" not in os.environ
    monkeypatch.setenv("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", "0")
    with loading_te_extra_state("run/iter_0000002", trusted=True):
        dst.load_state_dict(state)
    assert os.environ["NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"] == "0"


def test_foreign_checkpoint_refused_in_one_line(monkeypatch):
    monkeypatch.delenv("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", raising=False)
    state = _TE216Linear().state_dict()
    with pytest.raises(FP8StateRefused) as err:
        with loading_te_extra_state("other/iter_0000005"):
            _TE216Linear().load_state_dict(state)
    msg = str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLIs print it without a traceback
    assert "\n" not in msg and msg.startswith("other/iter_0000005: ")
    for fix in ("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1", gpu_rules.TE_SUPPORTED, "parallel.fp8_recipe=tensorwise"):
        assert fix in msg
    # any other load error passes through unchanged
    with pytest.raises(RuntimeError, match="size mismatch"):
        with loading_te_extra_state("x"):
            _TE216Linear().load_state_dict({"weight": torch.zeros(3)})


def test_refusal_is_not_mistaken_for_a_damaged_checkpoint(tmp_path):
    """resume_with_fallback must not try older iterations: they hold the same pickled state."""
    from megatron_longpo.training.checkpointing import resume_with_fallback

    def load(d):
        raise FP8StateRefused(f"{d}: refused")

    with pytest.raises(FP8StateRefused):
        resume_with_fallback(tmp_path, tmp_path / "iter_0000002", load, fallback=True, log=lambda m: None)
