"""FLOP formula vs PyTorch's FLOP counter on an HF Llama; attended pairs vs a brute-force mask;
the throughput's logit positions vs those the step computes."""

import pytest
import torch

from megatron_longpo.config import LongPOConfig, LossConfig, ModelConfig
from megatron_longpo.loss import logprobs
from megatron_longpo.runtime.distributed import ParallelGroups
from megatron_longpo.testing.pairs import synthetic_pair_batch
from megatron_longpo.training.flops import attended_pairs, forward_flops, train_flops
from megatron_longpo.training.loop import _throughput
from megatron_longpo.training.step import microbatch_objective


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


def _moe_pair():
    """(ModelConfig, HF model) of the same tiny Qwen3-MoE: 4 experts, top-2, qk-norm, head_dim 24."""
    transformers = pytest.importorskip("transformers")
    m = ModelConfig(arch="qwen3_moe", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, kv_channels=24, vocab_size=256, qk_layernorm=True, num_experts=4,
                    moe_router_topk=2, moe_ffn_hidden_size=48)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, num_experts=4, num_experts_per_tok=2, vocab_size=256,
        tie_word_embeddings=False, attn_implementation="eager", experts_implementation="eager"))
    return m, hf


def test_moe_flops_count_active_parameters_as_the_flop_counter():
    """HF's eager experts multiply only the routed tokens: k experts per token + the router GEMM."""
    from torch.utils.flop_counter import FlopCounterMode

    m, hf = _moe_pair()
    s = 32
    with FlopCounterMode(display=False) as fc:
        hf(torch.randint(0, 256, (1, s)))
    assert fc.get_total_flops() == forward_flops(m, n_tokens=s, n_attended=s * s, n_logit_positions=s)


def test_moe_memory_counts_every_expert_and_shards_them_over_ep():
    from megatron_longpo.config import ParallelConfig
    from megatron_longpo.training.memory_model import estimate_memory, parameter_count, parameter_split

    m, hf = _moe_pair()
    cfg = LongPOConfig(model=m)
    assert parameter_count(cfg) == sum(p.numel() for p in hf.parameters())
    dense, experts = parameter_split(cfg)
    assert experts == sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    cfg.optim.use_distributed_optimizer = False
    one = estimate_memory(cfg, 2)
    cfg2 = LongPOConfig(model=m, parallel=ParallelConfig(expert_model_parallel_size=2))
    cfg2.optim.use_distributed_optimizer = False
    two = estimate_memory(cfg2, 2)
    assert one.weights - two.weights == experts * 4 // 2  # fp32 params: half the experts per rank
    assert one.optimizer - two.optimizer == experts * 12 // 2
    assert two.moe_dispatch > 0
    # Distributed optimizer: at EP=1 the 2 expert-data-parallel replicas shard the experts' state;
    # at EP=2 each expert has one replica: the same bytes per rank either way.
    cfg.optim.use_distributed_optimizer = cfg2.optim.use_distributed_optimizer = True
    assert estimate_memory(cfg, 2).optimizer - estimate_memory(cfg2, 2).optimizer == 0


class _OutputLayer(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab, hidden))

    def output_weight(self) -> torch.Tensor:
        return self.weight


@pytest.mark.parametrize("mode,nll_weight", [("longpo", 1.0), ("longpo", 0.0), ("sft_rejected", 1.0)])
def test_throughput_counts_the_logits_the_step_computes(mode, nll_weight, monkeypatch):
    # Was: the NLL positions (the whole chosen sequence with nll_target=sequence) counted even with
    # loss.nll_weight=0, whose step scores the responses only: TFLOP/s (and MFU) overstated.
    m = ModelConfig(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_query_groups=2,
                    vocab_size=64)
    cfg = LongPOConfig(model=m, loss=LossConfig(mode=mode, nll_weight=nll_weight))
    batch = synthetic_pair_batch("two_sequences", pairs=2, prefix=12, response=4, vocab=64)
    groups = ParallelGroups(None, None, None, None, 0, 1, 0, 1, 0, 1)
    computed = []  # positions whose logits the step's log-prob sums compute

    def plan_rows(*a, **k):
        plan = real(*a, **k)
        computed.append(plan.idx.numel())
        return plan

    real = logprobs.plan_rows
    monkeypatch.setattr(logprobs, "plan_rows", plan_rows)
    hidden = torch.randn(batch.seq_len, batch.tokens.shape[0], m.hidden_size)
    microbatch_objective(_OutputLayer(64, m.hidden_size), hidden, batch, batch.for_cp_rank(0, 1), groups, cfg.loss,
                         64, False)
    assert len(computed) == 1 and computed[0] > 0
    flops = _throughput(cfg, [batch], 1.0, groups, world=1)["tflops_per_gpu"] * 1e12
    assert flops == pytest.approx(train_flops(m, batch.num_tokens(), attended_pairs(batch.branch_ids), computed[0]),
                                  rel=1e-12)
