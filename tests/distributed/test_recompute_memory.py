"""The memory model's recompute rules vs the activations autograd really keeps (saved-tensor hooks
on the real Megatron decoder, CPU, local spec).

On CPU the per-layer byte count differs from the CUDA one the model states (unfused SwiGLU and
RoPE, the project RMSNorm keep extra tensors), so the per-layer size is measured here and the
model's RULES are checked against it: full recompute keeps one input per layer, block recompute
keeps inputs for its n layers and everything for the others, core_attn recompute saves nothing
with a flash-class kernel, mlp recompute saves at least the SwiGLU tensors the model counts.
"""

import pytest
import torch

from megatron_longpo.config import LongPOConfig
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, random_tokens, tiny_model_config
from megatron_longpo.training.memory_model import saved_per_token, stored_per_token_per_layer

pytestmark = pytest.mark.distributed

MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2)
SEQ = 256


def _saved_elements_per_token(granularity, method, n, modules):
    """fp32 elements per token that autograd keeps for one forward of the model (weights excluded)."""
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed

    mcfg = tiny_model_config("llama", **MODEL)
    init_model_parallel(parallel_config())
    set_seed(0)
    model = build_model(mcfg, parallel_config(), recompute_granularity=granularity, recompute_method=method,
                        recompute_num_layers=n, recompute_modules=modules)
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = random_tokens(1, SEQ, mcfg.vocab_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(SEQ).unsqueeze(0), None, return_hidden=True)
    return sum(kept.values()) / SEQ / 4


def _cfg(granularity=None, method="uniform", n=1, modules=("core_attn",)) -> LongPOConfig:
    cfg = LongPOConfig()
    for k, v in MODEL.items():
        setattr(cfg.model, k, v)
    t = cfg.training
    t.recompute_granularity, t.recompute_method, t.recompute_num_layers, t.recompute_modules = granularity, method, n, list(modules)
    return cfg


def test_recompute_rules_match_saved_tensors():
    layers = MODEL["num_layers"]
    measure = lambda *a: run_distributed(_saved_elements_per_token, 1, args=a)[0]  # noqa: E731
    none = measure(None, None, None, None)
    full = measure("full", "uniform", 1, None)
    block2 = measure("full", "block", 2, None)
    attn = measure("selective", None, None, ["core_attn"])
    mlp = measure("selective", None, None, ["mlp"])
    parts = saved_per_token(_cfg())
    outside = full - layers * parts["layer_input"]  # embedding output + final norm: the same in every run
    assert 0 <= outside < 4 * MODEL["hidden_size"]
    every = (none - outside) / layers  # measured per-layer size without recompute
    # block: n layers keep their input, the others everything (the model's rule, with the measured size)
    assert layers * stored_per_token_per_layer(_cfg("full", "block", 2)) == \
        2 * parts["layer_input"] + (layers - 2) * sum(parts.values())
    assert block2 - outside == pytest.approx(2 * parts["layer_input"] + (layers - 2) * every, rel=0.01)
    assert full - outside == pytest.approx(layers * stored_per_token_per_layer(_cfg("full")), rel=0.01)
    # core_attn recompute: q, k, v stay as the checkpoint's inputs and the output as proj's input
    assert attn == pytest.approx(none, rel=0.01)
    assert stored_per_token_per_layer(_cfg("selective", modules=["core_attn"])) == sum(parts.values())
    # mlp recompute frees at least the 3f the model counts (the CPU's unfused SwiGLU keeps more)
    assert (none - mlp) / layers >= parts["mlp"]
    assert sum(parts.values()) - stored_per_token_per_layer(_cfg("selective", modules=["mlp"])) == parts["mlp"]
