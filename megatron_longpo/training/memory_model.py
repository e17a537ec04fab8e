"""Per-GPU memory and step-time model for a LongPO config (docs/scaling.md explains each term).

Pure arithmetic on a config, so users can check a 512K config before they queue it. All sizes
in bytes. The model assumes what the reference configs use: bf16 params, fp32 main grads,
fp32 master weights and optimizer state (Adam: 2 moments, RMSprop: 1), sharded over dp*cp by
the distributed optimizer when it is on (MoE experts: split over ep*etp, state over the
expert-data-parallel ranks), full activation recomputation (one stored layer input per layer), flash/TE attention (no
[s, s] scores), chunked log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longpo.config import LongPOConfig, padded_vocab_size
from megatron_longpo.data.pair_layout import PairLayout, rows_per_pair

GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights: int
    main_grads: int
    optimizer: int
    stored_activations: int
    layer_working_set: int
    kv_gather_buffers: int
    logprob_chunk: int
    total: int
    tokens_per_pair: int
    expert_params: int = 0  # of ``params``: MoE expert weights (split over ep * etp ranks)
    moe_dispatch: int = 0  # MoE: router probabilities + permuted token copies of one layer

    def lines(self) -> list[str]:
        rows = [
            ("weights (bf16, /tp)", self.weights),
            ("main grads (fp32, /tp)", self.main_grads),
            ("optimizer (fp32 master + state, /tp[/dp/cp])", self.optimizer),
            ("stored layer inputs (full recompute)", self.stored_activations),
            ("one layer's recompute working set", self.layer_working_set),
            ("K/V all-gather buffers (project CP attention)", self.kv_gather_buffers),
            ("log-prob chunk (fp32 logits, V/tp)", self.logprob_chunk),
            ("MoE router + token dispatch buffers (one layer)", self.moe_dispatch),
            ("total", self.total),
        ]
        return [f"  {name:<48s} {val / GiB:8.2f} GiB" for name, val in rows]


def parameter_count(cfg: LongPOConfig) -> int:
    """All parameters (MoE: every expert; the memory model's count)."""
    return sum(parameter_split(cfg))


def parameter_split(cfg: LongPOConfig) -> tuple[int, int]:
    """(non-expert parameters, MoE expert parameters): experts shard over ep * etp, the rest over tp."""
    m = cfg.model
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    v = padded_vocab_size(m, cfg.parallel.tensor_model_parallel_size)
    per_layer = h * (q + 2 * kv) + q * h + 2 * h + (q + 2 * kv if m.add_qkv_bias else 0)
    per_layer += 2 * d if m.qk_layernorm else 0
    experts = 0
    if m.num_experts:
        per_layer += m.num_experts * h  # router
        experts = m.num_layers * m.num_experts * 3 * h * m.expert_ffn_hidden_size
    else:
        per_layer += 3 * h * f
    emb = v * h * (1 if m.tie_word_embeddings else 2)
    return m.num_layers * per_layer + emb + h, experts


def resolve_dispatcher(choice: str) -> str:
    """The GPU run's MoE dispatcher (``auto`` is alltoall on CUDA; models/provider.py)."""
    return "alltoall" if choice == "auto" else choice


def estimate_memory(cfg: LongPOConfig, world_size: int, seq_tokens: int | None = None) -> MemoryEstimate:
    """Peak-ish memory of one GPU for a micro-batch of ``seq_tokens`` laid-out tokens per row.

    ``seq_tokens`` defaults to ``data.max_seq_length``; with ``two_sequences`` a micro-batch has
    2 rows per pair, with ``shared_prefix`` one.
    """
    m, p = cfg.model, cfg.parallel
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    dp = max(1, world_size // (tp * cp * p.pipeline_model_parallel_size))
    s = seq_tokens or cfg.data.max_seq_length
    rows = cfg.training.micro_batch_size * rows_per_pair(cfg.data.pair_layout)
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = m.num_query_groups * m.head_dim
    dense, experts = parameter_split(cfg)
    n = dense + experts
    # Experts: split over ep ranks and each over etp ranks; their data-parallel replicas (world /
    # (ep * etp * pp)) shard the distributed optimizer's state.
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or tp
    edp = max(1, world_size // (ep * etp * p.pipeline_model_parallel_size))
    wbytes = 2 if m.params_dtype == "bf16" else 4
    weights = dense * wbytes // tp + experts * wbytes // (ep * etp)
    grads = dense * 4 // tp + experts * 4 // (ep * etp)
    shard = dp * cp if cfg.optim.use_distributed_optimizer else 1
    eshard = edp if cfg.optim.use_distributed_optimizer else 1
    # fp32 master weights + state: Adam m and v, RMSprop square_avg, SGD momentum (Megatron's 0.9)
    state_bytes = {"adam": 12, "rmsprop": 8, "sgd": 8}[cfg.optim.optimizer]
    optimizer = dense * state_bytes // (tp * shard) + experts * state_bytes // (ep * etp * eshard)
    s_local = s // cp  # tokens of one row on this CP rank
    s_sp = s_local // tp if p.sequence_parallel else s_local
    act_bytes = 2 if m.params_dtype == "bf16" else 4
    # Full recompute stores each layer's input [s_local/tp, rows, h].
    stored = m.num_layers * rows * s_sp * h * act_bytes
    # Recomputing one layer: attention + MLP intermediates. ~ (qkv + attn out + norms) on h and
    # the SwiGLU intermediates on f, sharded by tp (SP shards the h-sized ones too); fp8 keeps
    # some copies in 1 byte, ignored here (conservative).
    ffn = s_local * (3 * f // tp) * 3
    dispatch = 0
    if m.num_experts:
        # The MoE layer takes this rank's (SP-sharded) tokens; with balanced routing each rank's
        # experts receive k copies of as many tokens, through an expert of m split over etp.
        # Dispatch: fp32 router logits + probs [tokens, E] and the permuted input + output copies
        # [tokens * k, h] (alltoall; allgather gathers the TP group's tokens, tp times more).
        k, mf = m.moe_router_topk, m.expert_ffn_hidden_size
        gathered = tp if resolve_dispatcher(m.moe_token_dispatcher) == "allgather" else 1
        ffn = s_sp * k * (3 * mf // etp) * 3
        tokens = rows * s_sp * gathered
        dispatch = tokens * m.num_experts * 4 * 2 + tokens * k * h * act_bytes * 2
    working = rows * act_bytes * (s_sp * h * 10 + ffn + s_local * (h + 2 * kv) // tp * 3)
    # Project CP attention gathers K/V of the whole row for one layer (and its grads in backward).
    kv_buf = 0
    if cp > 1:
        kv_buf = rows * s * (2 * kv // tp) * act_bytes * 2
    vocab_local = padded_vocab_size(m, tp) // tp
    chunk = min(cfg.loss.logprob_chunk_size, s_local * rows)
    logprob = chunk * vocab_local * 4 * 2  # logits + their softmax grad in backward
    total = weights + grads + optimizer + stored + working + kv_buf + logprob + dispatch
    return MemoryEstimate(n, weights, grads, optimizer, stored, working, kv_buf, logprob, total, s,
                          expert_params=experts, moe_dispatch=dispatch)


def estimate_step_seconds(cfg: LongPOConfig, world_size: int, tflops_per_gpu: float, seq_tokens: int | None = None,
                          shared_prefix_response_tokens: int = 4096) -> float:
    """Seconds per optimizer step at an assumed sustained model TFLOP/s per GPU.

    A pair is two full rows of ``seq_tokens`` (two_sequences), or one row of ``seq_tokens`` whose
    last ``shared_prefix_response_tokens`` are the two branches, half each (shared_prefix).
    """
    # deferred: flops.py imports torch; estimate_memory.py answers --help / config errors first
    from megatron_longpo.training.flops import attended_pairs, train_flops

    m = cfg.model
    s = seq_tokens or cfg.data.max_seq_length
    pairs = cfg.training.global_batch_size
    if cfg.data.pair_layout == "two_sequences":
        pair = PairLayout.of_pair("two_sequences", prefix=0, chosen=s, rejected=s)
    else:
        r = min(shared_prefix_response_tokens, s) // 2  # a row shorter than the responses: no prefix
        pair = PairLayout.of_pair("shared_prefix", prefix=s - 2 * r, chosen=r, rejected=r)
    tokens = pair.num_tokens()
    flops = pairs * train_flops(m, tokens, attended_pairs(pair), n_logit_positions=tokens)
    # Full recompute adds one forward of the layers (4/3 of model FLOPs).
    if cfg.training.recompute_granularity == "full":
        flops *= 4.0 / 3.0
    return flops / (world_size * tflops_per_gpu * 1e12)
