"""runtime/capabilities.py: the one place that decides what this machine runs (CPU here; the
CUDA answers are simulated by patching torch.cuda.is_available, as test_gpu_rules.py does)."""

import importlib.util
import inspect

import pytest
import torch
import torch.distributed as dist

from megatron_longpo.runtime import capabilities as caps
from megatron_longpo.runtime.distributed import process_group_kwargs


def test_cpu_answers(monkeypatch):
    """Without CUDA every GPU answer is no, whatever is installed (CUDA hidden, so this runs on GPU nodes too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not caps.cuda_available()
    assert caps.device() == torch.device("cpu") and caps.default_backend() == "gloo"
    assert not caps.te_available() and not caps.flash_attn_available() and not caps.grad_accum_fusion_available()
    assert not caps.fa3_available()
    found = caps.Capabilities.detect()
    assert (found.cuda, found.te, found.flash_attn, found.grad_accum_fusion, found.fa3) == (False,) * 5
    assert caps.unavailable_reason("flash_attn") == "no CUDA device"


def test_import_failure_is_kept_not_swallowed(monkeypatch):
    """A wrong binary (e.g. flash-attn built for another torch) fails with an OSError/ImportError at
    import: the probe keeps the one-line reason, which the error of a requested kernel carries."""
    def broken():
        raise ImportError("/site-packages/flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice\nmore")

    monkeypatch.setitem(caps._IMPORTERS, "flash_attn", broken)
    caps.probe.cache_clear()
    try:
        assert caps.import_error("flash_attn").startswith("ImportError: /site-packages/flash_attn_2_cuda.so: undefined")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert not caps.flash_attn_available()
        assert "undefined symbol" in caps.unavailable_reason("flash_attn")
        assert ("flash_attn", caps.import_error("flash_attn")) in caps.Capabilities.detect().import_errors
    finally:
        caps.probe.cache_clear()


def test_cuda_without_the_gpu_extras(monkeypatch):
    """CUDA present but TE / flash-attn / apex absent (their import probes decide, not CUDA alone)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert caps.cuda_available() and caps.default_backend() == "nccl"
    assert caps.te_available() == (importlib.util.find_spec("transformer_engine") is not None)
    assert caps.flash_attn_available() == (importlib.util.find_spec("flash_attn") is not None)
    assert caps.grad_accum_fusion_available() == (importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None)


def test_transformer_impl_policy():
    assert caps.resolve_transformer_impl("auto", te=True) == "transformer_engine"
    assert caps.resolve_transformer_impl("auto", te=False) == "local"
    assert caps.resolve_transformer_impl("local", te=True) == "local"
    assert caps.resolve_transformer_impl("transformer_engine", te=True) == "transformer_engine"
    with pytest.raises(RuntimeError, match="model.transformer_impl=local"):
        caps.resolve_transformer_impl("transformer_engine", te=False)


@pytest.mark.parametrize("requested,cuda,expected", [(True, True, True), (True, False, False),
                                                     (False, True, False), (False, False, False)])
def test_distributed_optimizer_is_cuda_only(requested, cuda, expected):
    assert caps.use_distributed_optimizer(requested, cuda) is expected


def test_nccl_binds_the_device_up_front():
    """init_process_group gets device_id with NCCL (eager communicator), never with gloo."""
    assert "device_id" in inspect.signature(dist.init_process_group).parameters
    kw = process_group_kwargs("nccl", 3, 8, 30, torch.device("cuda", 3))
    assert kw["device_id"] == torch.device("cuda", 3) and kw["rank"] == 3 and kw["world_size"] == 8
    assert "device_id" not in process_group_kwargs("gloo", 0, 2, 30, None)
    assert "device_id" not in process_group_kwargs("gloo", 0, 2, 30, torch.device("cuda", 0))
