"""runtime/capabilities.py: the one place that decides what this machine runs (CPU here; the
CUDA answers are simulated by patching torch.cuda.is_available, as test_gpu_rules.py does)."""

import importlib.util

import pytest
import torch

from megatron_longpo.runtime import capabilities as caps


def test_cpu_answers():
    assert not caps.cuda_available()
    assert caps.device() == torch.device("cpu") and caps.default_backend() == "gloo"
    assert not caps.te_available() and not caps.flash_attn_available() and not caps.grad_accum_fusion_available()
    assert caps.Capabilities.detect() == caps.Capabilities(cuda=False, te=False, flash_attn=False, grad_accum_fusion=False)


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
