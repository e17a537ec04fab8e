"""CUDA-only: the Transformer Engine layer spec computes what the local spec computes.

Skipped without CUDA / Transformer Engine. Single process (TP=1).
"""

import pytest
import torch

from megatron_longpo.testing.models import parallel_config, tiny_model_config

pytestmark = pytest.mark.gpu

TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def _local_name(te_name: str) -> str:
    for te, local in TE_TO_LOCAL.items():
        if te_name.endswith(te):
            return te_name[: -len(te)] + local
    return te_name


@pytest.fixture(scope="module")
def single_process_groups():
    import os

    from megatron_longpo.runtime.distributed import destroy, init_distributed, init_model_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    pc = parallel_config()
    init_distributed(pc)
    g = init_model_parallel(pc)
    yield g
    destroy()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_te_spec_matches_local_spec(single_process_groups, arch):
    pytest.importorskip("transformer_engine")
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import set_seed

    set_seed(0)
    local = build_model(tiny_model_config(arch, transformer_impl="local"), parallel_config())
    te = build_model(tiny_model_config(arch, transformer_impl="transformer_engine"), parallel_config())
    local_params = dict(local.named_parameters())
    with torch.no_grad():
        for name, p in te.named_parameters():
            p.copy_(local_params[_local_name(name)])
    tokens = torch.randint(0, 200, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    out_local = local(tokens, pos, None)
    out_te = te(tokens, pos, None)
    torch.testing.assert_close(out_te, out_local, rtol=2e-4, atol=2e-4)
    hidden = te(tokens, pos, None, return_hidden=True)
    torch.testing.assert_close(torch.einsum("sbh,vh->bsv", hidden, te.output_weight()), out_te, rtol=1e-4, atol=1e-4)


def test_te_bf16_forward_backward(single_process_groups):
    pytest.importorskip("transformer_engine")
    from megatron_longpo.models.provider import build_model

    model = build_model(tiny_model_config("mistral", transformer_impl="transformer_engine", params_dtype="bf16"),
                        parallel_config())
    tokens = torch.randint(0, 200, (1, 128), device="cuda")
    pos = torch.arange(128, device="cuda").unsqueeze(0)
    loss = model(tokens, pos, None, labels=tokens.roll(-1, 1)).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
