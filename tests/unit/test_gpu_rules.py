"""Start-up rules of the GPU path, checked on CPU (issue: first H100/H200 run).

Each rule is what TE / Megatron-Core assert at run time (gpu_rules.py cites them); the tests feed
configs that break exactly one rule and expect a ConfigError naming the option, and configs that
satisfy them to pass.
"""

import dataclasses

import pytest
import torch
from megatron.core.tensor_parallel import layers as mcore_tp_layers

from megatron_longpo.config import (
    ConfigError,
    DataConfig,
    LongPOConfig,
    ModelConfig,
    ParallelConfig,
    apply_overrides,
    seq_length_multiple,
    validate,
)
from megatron_longpo.gpu_rules import fp8_device_errors, nvte_env_errors
from megatron_longpo.models.attention.kernels import choose_sdpa
from megatron_longpo.models.provider import _output_layer_without_wgrad_fusion, fusion_settings
from megatron_longpo.runtime import capabilities
from megatron_longpo.runtime.gpu_env import (
    check_process_environment,
    local_world_size_errors,
    set_max_connections,
)

# A Llama-8B-shaped model (h 4096, 32 heads, 8 KV heads, ffn 14336) is FP8-clean at tp 1..8.
BIG = ModelConfig(num_layers=2, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                  num_query_groups=8, vocab_size=32000, max_position_embeddings=131072,
                  params_dtype="bf16", transformer_impl="transformer_engine")


def _cfg(model=BIG, seq=8192, **parallel):
    return LongPOConfig(model=model, parallel=ParallelConfig(**parallel), data=DataConfig(max_seq_length=seq))


# ---------------------------------------------------------------------------- FP8 (defect 4)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
def test_fp8_recipes_validate_and_reach_megatron(recipe):
    cfg = _cfg(fp8="hybrid", fp8_recipe=recipe, tensor_model_parallel_size=8)
    validate(cfg, world_size=8)
    from megatron.core.enums import Fp8Recipe

    assert Fp8Recipe(recipe).value == recipe  # every exposed recipe is one Megatron 0.16.1 accepts


def test_fp8_recipe_options_parse_from_overrides():
    cfg = apply_overrides(_cfg(), ["--parallel.fp8=e4m3", "--parallel.fp8_recipe=tensorwise",
                                   "--parallel.fp8_amax_history_len=16", "--parallel.fp8_amax_compute_algo=most_recent"])
    assert (cfg.parallel.fp8_recipe, cfg.parallel.fp8_amax_history_len, cfg.parallel.fp8_amax_compute_algo) == (
        "tensorwise", 16, "most_recent")
    with pytest.raises(ConfigError, match="fp8_recipe"):
        apply_overrides(_cfg(), ["--parallel.fp8_recipe=nvfp4"])


def test_fp8_refused_with_local_layers():
    with pytest.raises(ConfigError, match="transformer_impl=local"):
        validate(_cfg(model=dataclasses.replace(BIG, transformer_impl="local"), fp8="hybrid"))


def test_fp8_needs_bf16_and_history():
    with pytest.raises(ConfigError, match="params_dtype=bf16"):
        validate(_cfg(model=dataclasses.replace(BIG, params_dtype="fp32"), fp8="hybrid"))
    with pytest.raises(ConfigError, match="fp8_amax_history_len"):
        validate(_cfg(fp8="hybrid", fp8_amax_history_len=0))


@pytest.mark.parametrize("change, tp, needle", [
    (dict(ffn_hidden_size=14336 + 8), 1, "ffn_hidden_size / tp"),  # 14344 % 16 = 8
    (dict(hidden_size=4104, kv_channels=128), 1, "model.hidden_size"),  # 4104 % 16 = 8
    # Mistral-like 32 heads / 8 groups, head dim 24 at tp 8: (4+2)*24 = 144 ok, proj 4*24 = 96 ok;
    # head dim 20: QKV (4+2)*20 = 120 % 16 = 8
    (dict(kv_channels=20), 8, "QKV output per TP rank"),
])
def test_fp8_gemm_dims_are_checked(change, tp, needle):
    model = dataclasses.replace(BIG, **change)
    cfg = _cfg(model=model, fp8="hybrid", tensor_model_parallel_size=tp)
    with pytest.raises(ConfigError, match=needle):
        validate(cfg, world_size=tp)


def test_fp8_mxfp8_alignment_is_32():
    model = dataclasses.replace(BIG, ffn_hidden_size=14336 + 16)  # % 16 == 0, % 32 == 16
    validate(_cfg(model=model, fp8="hybrid", fp8_recipe="delayed"))
    with pytest.raises(ConfigError, match="divisible by 32"):
        validate(_cfg(model=model, fp8="hybrid", fp8_recipe="mxfp8"))


def test_fp8_sequence_multiple_per_cp_rank():
    p = ParallelConfig(fp8="hybrid", context_parallel_size=2)
    assert seq_length_multiple(p) == 64  # 16 tokens per zigzag chunk, 2*cp chunks
    assert seq_length_multiple(dataclasses.replace(p, fp8_recipe="mxfp8")) == 128
    with pytest.raises(ConfigError, match="multiple of 64"):
        validate(_cfg(seq=8192 + 32, fp8="hybrid", context_parallel_size=2), world_size=2)


def test_fp8_device_rules():
    p = ParallelConfig(fp8="hybrid", fp8_recipe="mxfp8")
    assert "Blackwell" in fp8_device_errors(p, (9, 0))[0]
    assert fp8_device_errors(p, (10, 0)) == []
    assert fp8_device_errors(dataclasses.replace(p, fp8_recipe="delayed"), (9, 0)) == []
    assert "8.9" in fp8_device_errors(dataclasses.replace(p, fp8_recipe="delayed"), (8, 0))[0]


# ---------------------------------------------------------------------------- TE CP a2a (defect 6)


def test_a2a_needs_heads_and_kv_heads_divisible_by_cp():
    mistral = dataclasses.replace(BIG, num_attention_heads=32, num_query_groups=8)
    # tp 8: one KV head per rank, cp 2 cannot scatter it
    with pytest.raises(ConfigError, match="num_query_groups/tp = 1"):
        validate(_cfg(model=mistral, tensor_model_parallel_size=8, context_parallel_size=2, cp_comm_type="a2a",
                      attention_backend="te"), world_size=16)
    validate(_cfg(model=mistral, tensor_model_parallel_size=4, context_parallel_size=2, cp_comm_type="a2a",
                  attention_backend="te"), world_size=8)
    # p2p has no such rule; the project attention ignores cp_comm_type
    validate(_cfg(model=mistral, tensor_model_parallel_size=8, context_parallel_size=2, cp_comm_type="p2p"), world_size=16)
    validate(_cfg(model=mistral, tensor_model_parallel_size=8, context_parallel_size=2, cp_comm_type="a2a",
                  attention_backend="sdpa"), world_size=16)


def test_a2a_p2p_refused():
    with pytest.raises(ConfigError, match="hierarchical"):
        validate(_cfg(context_parallel_size=2, cp_comm_type="a2a+p2p", attention_backend="te"), world_size=2)


# ---------------------------------------------------------------------------- environment (defects 2, 6)


def test_nvte_values_megatron_asserts_on():
    assert nvte_env_errors({"NVTE_FLASH_ATTN": "1"}) == []
    errs = nvte_env_errors({"NVTE_FLASH_ATTN": "0", "NVTE_FUSED_ATTN": "1", "NVTE_UNFUSED_ATTN": "0"})
    assert len(errs) == 2 and "unset NVTE_FLASH_ATTN" in errs[0]
    with pytest.raises(ConfigError, match="NVTE_FUSED_ATTN"):
        check_process_environment(ParallelConfig(), {"NVTE_FUSED_ATTN": "0"}, visible_gpus=0)


@pytest.mark.parametrize("local_world, local_rank, gpus, ok", [(2, 1, 1, False), (2, 0, 1, False), (1, 0, 1, True),
                                                                (8, 7, 8, True), (1, 1, 1, False)])
def test_local_world_size_larger_than_visible_gpus_is_refused(local_world, local_rank, gpus, ok):
    env = {"LOCAL_WORLD_SIZE": str(local_world), "LOCAL_RANK": str(local_rank), "CUDA_VISIBLE_DEVICES": "0"}
    errs = local_world_size_errors(env, gpus, "nccl")
    assert (errs == []) == ok
    if not ok:
        assert f"--nproc-per-node {gpus}" in errs[0]
        with pytest.raises(ConfigError, match="nproc-per-node"):
            check_process_environment(ParallelConfig(), env, visible_gpus=gpus, backend="nccl")
    assert local_world_size_errors(env, gpus, "gloo") == []  # CPU processes need no GPU


def test_init_distributed_refuses_before_process_group(monkeypatch):
    """The real entry point (all CLIs call it) with a simulated 1-GPU machine and 2 local ranks."""
    import torch.distributed as dist

    from megatron_longpo.runtime import distributed as rd

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(rd.cpu_compat, "enable", lambda: False)
    called = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: called.append(1))
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a, **k: called.append(2))
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="--nproc-per-node 1"):
        rd.init_distributed(ParallelConfig())
    assert called == []


def test_cuda_device_max_connections():
    env: dict = {}
    assert set_max_connections(ParallelConfig(tensor_model_parallel_size=2), env, cuda_initialized=False) == "1"
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    env = {}
    assert set_max_connections(ParallelConfig(), env, cuda_initialized=False) is None and env == {}
    with pytest.raises(ConfigError, match="CUDA_DEVICE_MAX_CONNECTIONS=8"):
        set_max_connections(ParallelConfig(context_parallel_size=2), {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}, False)
    with pytest.raises(ConfigError, match="export CUDA_DEVICE_MAX_CONNECTIONS=1"):
        set_max_connections(ParallelConfig(context_parallel_size=2), {}, cuda_initialized=True)


# ---------------------------------------------------------------------------- SDPA kernel choice (defect 5)

HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 320])
def test_cuda_kernel_choice_never_math(dtype, gqa, square, head_dim):
    c = choose_sdpa("cuda", dtype, gqa, square, head_dim)
    assert c.backends and "MATH" not in c.backends
    assert c.mask == ("causal" if square else "lower_right")  # never a dense mask on CUDA
    flash_ok = dtype in HALF and head_dim <= 256
    # Only flash takes enable_gqa: any other allowed backend needs K/V expanded.
    if gqa and not c.expand_kv:
        assert c.backends == ("FLASH_ATTENTION",) and flash_ok
    if dtype == torch.float32:
        assert "FLASH_ATTENTION" not in c.backends and c.expand_kv == gqa
    if not gqa:
        assert not c.expand_kv


def test_cpu_kernel_choice():
    assert choose_sdpa("cpu", torch.float32, True, False, 64).mask == "dense"
    c = choose_sdpa("cpu", torch.float32, True, True, 64)
    assert c.mask == "causal" and not c.expand_kv and c.backends == ()


def test_expanded_kv_matches_gqa():
    """The fp32 GQA path (expanded K/V) computes what native GQA computes (float64 reference)."""
    from megatron_longpo.models.attention.kernels import _expand_kv

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 16, 8, dtype=torch.float64), torch.randn(1, 2, 16, 8, dtype=torch.float64), \
        torch.randn(1, 2, 16, 8, dtype=torch.float64)
    ke, ve = _expand_kv(k, v, 8)
    a = torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
    b = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- fusions (defect 7)


def test_fusions_on_cuda_with_te():
    f = fusion_settings(on_cuda=True, impl="transformer_engine", te_attention=True)
    assert f["bias_activation_fusion"] and f["bias_dropout_fusion"] and f["apply_rope_fusion"]
    assert f["gradient_accumulation_fusion"]  # TE linears fuse wgrad without apex
    # the fused wgrad writes param.main_grad, which only Megatron DDP creates
    assert not fusion_settings(on_cuda=True, impl="transformer_engine", te_attention=True,
                               ddp=False)["gradient_accumulation_fusion"]
    f = fusion_settings(on_cuda=True, impl="transformer_engine", te_attention=False)
    assert not f["apply_rope_fusion"] and f["gradient_accumulation_fusion"]
    assert not fusion_settings(on_cuda=True, impl="local", te_attention=False)["gradient_accumulation_fusion"]
    f = fusion_settings(on_cuda=False, impl="local", te_attention=False)
    assert not any(f.values())


def test_output_layer_builds_with_wgrad_fusion_and_without_apex():
    """The local output layer refuses gradient_accumulation_fusion without apex at construction;
    build_model scopes that refusal away (and restores Megatron's module flag afterwards)."""
    if capabilities.grad_accum_fusion_available():
        pytest.skip("apex's fused_weight_gradient_mlp_cuda is installed: nothing to work around")
    before = mcore_tp_layers._grad_accum_fusion_available
    with _output_layer_without_wgrad_fusion(True):
        assert mcore_tp_layers._grad_accum_fusion_available
    assert mcore_tp_layers._grad_accum_fusion_available == before


def test_cuda_fusion_flags_build_a_valid_megatron_config():
    """Megatron's own TransformerConfig validation accepts the CUDA flags for this model family."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    f = fusion_settings(on_cuda=True, impl="local", te_attention=False)
    TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                      gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
                      normalization="RMSNorm", **f)
