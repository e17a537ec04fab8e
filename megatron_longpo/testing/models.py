"""Tiny model configs and helpers shared by tests and benchmarks."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_longpo.config import ModelConfig, ParallelConfig

# One tiny config per family of megatron_longpo/architectures.py (tests/unit/test_architectures.py).
TINY_ARCHS: dict[str, dict[str, Any]] = {
    # GQA 2:1, untied
    "llama": dict(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, vocab_size=250, rope_theta=10000.0, norm_epsilon=1e-5),
    # GQA 4:1 (heads 8, groups 2), untied, large rope base as the LongPO policy uses
    "mistral": dict(arch="mistral", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                    num_query_groups=2, vocab_size=300, rope_theta=1e7, norm_epsilon=1e-5),
    # QKV bias, tied embeddings, MHA-ish ratio 1 with 2 groups
    "qwen2": dict(arch="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2,
                  num_query_groups=2, vocab_size=270, rope_theta=1e6, norm_epsilon=1e-6,
                  add_qkv_bias=True, tie_word_embeddings=True),
    # q/k RMSNorm, head dim 24 != 64 / 4, GQA 2:1, tied
    "qwen3": dict(arch="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_query_groups=2, kv_channels=24, vocab_size=260, rope_theta=1e6, norm_epsilon=1e-6,
                  qk_layernorm=True, tie_word_embeddings=True),
    # 4 experts, top-2 without renormalisation (Qwen3-MoE norm_topk_prob=false); aux loss off
    # (the serial brute-force references have none; tests turn it on with moe_aux_loss_coeff)
    "qwen3_moe": dict(arch="qwen3_moe", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      num_query_groups=2, vocab_size=260, rope_theta=1e6, norm_epsilon=1e-6, qk_layernorm=True,
                      num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48, moe_norm_topk_prob=False,
                      moe_aux_loss_coeff=0.0),
    # 4 experts, top-2 renormalised, GQA 4:1
    "mixtral": dict(arch="mixtral", num_layers=2, hidden_size=64, ffn_hidden_size=80, num_attention_heads=8,
                    num_query_groups=2, vocab_size=280, rope_theta=1e6, norm_epsilon=1e-5,
                    num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.0),
}


def tiny_model_config(arch: str = "llama", **overrides: Any) -> ModelConfig:
    kw = dict(TINY_ARCHS[arch])
    kw.update(max_position_embeddings=512, transformer_impl="local")
    kw.update(overrides)
    return ModelConfig(**kw)


def parallel_config(tp: int = 1, cp: int = 1, ep: int = 1, **kw: Any) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp, expert_model_parallel_size=ep, **kw)


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)
