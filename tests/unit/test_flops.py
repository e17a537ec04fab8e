"""FLOP formula vs PyTorch's FLOP counter on an HF Llama; attended pairs vs a brute-force mask."""

import pytest
import torch

from megatron_longpo.config import LongPOConfig, ModelConfig
from megatron_longpo.training.flops import attended_pairs, forward_flops


def _brute_force_pairs(branch_ids: torch.Tensor) -> int:
    total = 0
    for row in branch_ids.tolist():
        for i, bi in enumerate(row):
            if bi < 0:
                continue
            for j in range(i + 1):
                bj = row[j]
                if bj < 0 or (bi == 2 and bj == 1):
                    continue
                total += 1
    return total


def test_attended_pairs_matches_mask():
    rows = torch.tensor([
        [0, 0, 0, 1, 1, 2, 2, 2, -1, -1],
        [0, 0, 0, 0, 0, 0, 0, -1, -1, -1],
        [0, 1, 1, 1, 1, 2, -1, -1, -1, -1],
    ])
    assert attended_pairs(rows) == _brute_force_pairs(rows)


def test_forward_flops_match_flop_counter():
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    m = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                    vocab_size=100)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, attn_implementation="eager"))
    s = 32
    with FlopCounterMode(display=False) as fc:
        hf(torch.randint(0, 100, (1, s)))
    # Eager attention computes the full (masked) s x s score matrix: s*s pairs.
    assert fc.get_total_flops() == forward_flops(m, n_tokens=s, n_attended=s * s, n_logit_positions=s)


def test_memory_model_parameter_count_matches_hf():
    transformers = pytest.importorskip("transformers")
    from megatron_longpo.training.memory_model import parameter_count

    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, tie_word_embeddings=False))
    cfg = LongPOConfig(model=ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                                         num_query_groups=2, vocab_size=256, add_qkv_bias=True))
    assert parameter_count(cfg) == sum(p.numel() for p in hf.parameters())
