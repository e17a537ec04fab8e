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


@pytest.fixture
def no_tf32():
    """fp32 references must be true fp32 (torch matmuls and cuDNN may otherwise use TF32)."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def _copy_into(te, local):
    local_params = dict(local.named_parameters())
    with torch.no_grad():
        for name, p in te.named_parameters():
            p.copy_(local_params[_local_name(name)])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_te_spec_matches_local_spec(single_process_groups, no_tf32, arch):
    """TE bf16 and local bf16 are equally close to the local fp32 (no TF32) model, same weights.

    Comparing TE fp32 against local fp32 directly is wrong: TE runs fp32 GEMMs as TF32 (10-bit
    mantissa). Instead both specs run in bf16 from the same (bf16-representable) weights and each
    is measured against the true-fp32 local model: TE's error must be within 1.5x of the local
    bf16 error plus 1e-3 (reduction order differs, the precision does not).
    """
    pytest.importorskip("transformer_engine")
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import set_seed

    set_seed(0)
    local16 = build_model(tiny_model_config(arch, transformer_impl="local", params_dtype="bf16"), parallel_config())
    te16 = build_model(tiny_model_config(arch, transformer_impl="transformer_engine", params_dtype="bf16"),
                       parallel_config(attention_backend="te"))
    local32 = build_model(tiny_model_config(arch, transformer_impl="local"), parallel_config())
    _copy_into(te16, local16)
    with torch.no_grad():
        for (n, p32), p16 in zip(local32.named_parameters(), local16.parameters()):
            p32.copy_(p16.float())
    tokens = torch.randint(0, 200, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    ref = local32(tokens, pos, None).float()
    err_local = (local16(tokens, pos, None).float() - ref).abs().max().item()
    err_te = (te16(tokens, pos, None).float() - ref).abs().max().item()
    assert err_te <= 1.5 * err_local + 1e-3, (err_te, err_local)


def test_te_spec_with_project_attention_shared_prefix(single_process_groups):
    """TE layers + the project attention: shared_prefix log-probs equal two_sequences ones."""
    pytest.importorskip("transformer_engine")
    import dataclasses

    from megatron_longpo.config import LossConfig
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import set_seed
    from megatron_longpo.testing.pairs import synthetic_pair_batch
    from megatron_longpo.training.step import microbatch_forward

    mcfg = tiny_model_config("llama", transformer_impl="transformer_engine", params_dtype="bf16")
    set_seed(0)
    model = build_model(mcfg, parallel_config(attention_backend="sdpa"), pair_layout="shared_prefix")
    loss_cfg = LossConfig(mode="longpo")
    out = {}
    for layout in ("two_sequences", "shared_prefix"):
        batch = synthetic_pair_batch(layout, 2, 300, 24, mcfg.vocab_size, multiple=16)
        with torch.no_grad():
            _, metrics = microbatch_forward(model, batch, single_process_groups, loss_cfg, mcfg.vocab_size, False)
        out[layout] = {k: float(v) for k, v in metrics.items()}
    for k in ("logps/chosen", "logps/rejected"):
        # sums over ~25 bf16 log-probs of ~-5.5: bf16 activations differ in summation order only
        assert abs(out["shared_prefix"][k] - out["two_sequences"][k]) < 0.25, (k, out)


def test_32k_token_pair_trains_without_math_attention(single_process_groups):
    """A 32K-token pair through forward + backward in bf16 and in fp32 (GQA): fused kernels only."""
    from megatron_longpo.config import LossConfig
    from megatron_longpo.models.attention import kernels
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import set_seed
    from megatron_longpo.testing.pairs import synthetic_pair_batch
    from megatron_longpo.training.step import microbatch_forward

    for dtype in ("bf16", "fp32"):
        mcfg = tiny_model_config("mistral", params_dtype=dtype, max_position_embeddings=65536)
        set_seed(0)
        model = build_model(mcfg, parallel_config(attention_backend="sdpa"), pair_layout="shared_prefix")
        kernels.KERNEL_CHOICES.clear()
        batch = synthetic_pair_batch("shared_prefix", 1, 32768 - 2 * 257, 256, mcfg.vocab_size, multiple=16)
        torch.cuda.reset_peak_memory_stats()
        loss, _ = microbatch_forward(model, batch, single_process_groups, LossConfig(mode="longpo"),
                                     mcfg.vocab_size, False)
        loss.backward()
        assert torch.isfinite(loss)
        assert all("MATH" not in k for k in kernels.KERNEL_CHOICES), kernels.KERNEL_CHOICES
        # 8 heads x 32K^2 fp32 scores would be 32 GiB: the fused kernels stay far below
        assert torch.cuda.max_memory_allocated() < 8 * 2**30


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
