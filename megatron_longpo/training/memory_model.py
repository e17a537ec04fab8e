"""Per-GPU memory and step-time model for a LongPO config (docs/scaling.md explains each term).

Pure arithmetic on a config, so users can check a 512K config before they queue it. All sizes
in bytes. The model assumes what the reference configs use: bf16 params, fp32 main grads,
fp32 master weights and optimizer state (Adam: 2 moments, RMSprop: 1), sharded over dp*cp by
the distributed optimizer when it is on (MoE experts: split over ep*etp, state over the
expert-data-parallel ranks), flash/TE attention (no [s, s] scores), chunked log-probs.
Activations follow ``training.recompute_*`` (:func:`saved_per_token`): full recompute stores one
layer input per recompute unit, block recompute stores full activations for the layers it does not
recompute, selective recompute drops the module outputs it recomputes (:func:`recompute_choices`
lists each choice with its memory and extra FLOPs; :func:`cheapest_recompute` picks the fastest
that fits).

Pipeline parallelism (PP, VPP): every term is per stage and the estimate is the stage that needs
the most (usually the first): its layers' weights, grads and optimizer state; the embedding on the
first stage, the output layer (and final norm) on the last (a tied embedding is held by both);
the stored layer inputs of every micro-batch in flight (1F1B: stage r holds pp - r micro-batches;
interleaved: (pp - r - 1) * 2 + (vpp - 1) * pp + 1 chunk micro-batches, Megatron's warm-up
count, each 1/vpp of the stage's layers); the log-prob chunk on the last stage only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from megatron_longpo.config import LongPOConfig, padded_vocab_size, pipeline_stage_layers
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
    recompute: str = "full/uniform/1"
    stage: int = 0  # the pipeline stage this estimate is for (the one that needs the most)
    pipeline_stages: int = 1
    in_flight: int = 1  # micro-batches (x chunk) whose layer inputs this stage keeps at once
    stage_params: int = 0  # parameters on that stage (= params without PP)
    expert_params: int = 0  # of ``params``: MoE expert weights (split over ep * etp ranks)
    moe_dispatch: int = 0  # MoE: router probabilities + permuted token copies of one layer

    def lines(self) -> list[str]:
        rows = [
            ("weights (bf16, /tp)", self.weights),
            ("main grads (fp32, /tp)", self.main_grads),
            ("optimizer (fp32 master + state, /tp[/dp/cp])", self.optimizer),
            (f"stored activations ({self.recompute})", self.stored_activations),
            ("one layer's recompute working set", self.layer_working_set),
            ("K/V all-gather buffers (project CP attention)", self.kv_gather_buffers),
            ("log-prob chunk (fp32 logits, V/tp)", self.logprob_chunk),
            ("MoE router + token dispatch buffers (one layer)", self.moe_dispatch),
            ("total", self.total),
        ]
        out = [f"  {name:<48s} {val / GiB:8.2f} GiB" for name, val in rows]
        if self.pipeline_stages > 1:
            out.insert(0, f"  pipeline stage {self.stage} of {self.pipeline_stages} (the largest): "
                          f"{self.stage_params / 1e9:.2f}B params, {self.in_flight} micro-batch chunk(s) in flight")
        return out


def _layer_params(cfg: LongPOConfig) -> int:
    m = cfg.model
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    return h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h + (q + 2 * kv if m.add_qkv_bias else 0)


def parameter_count(cfg: LongPOConfig) -> int:
    """All parameters (MoE: every expert; the memory model's count)."""
    return sum(parameter_split(cfg))


def parameter_split(cfg: LongPOConfig) -> tuple[int, int]:
    """(non-expert parameters, MoE expert parameters): experts shard over ep * etp, the rest over tp."""
    m = cfg.model
    v = padded_vocab_size(m, cfg.parallel.tensor_model_parallel_size)
    h = m.hidden_size
    emb = v * h * (1 if m.tie_word_embeddings else 2)
    dense, experts = _layer_params(cfg)
    return m.num_layers * dense + emb + h, m.num_layers * experts


def _layer_params(cfg: LongPOConfig) -> tuple[int, int]:
    """(non-expert, MoE expert) parameters of one transformer layer."""
    m = cfg.model
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    dense = h * (q + 2 * kv) + q * h + 2 * h + (q + 2 * kv if m.add_qkv_bias else 0)
    dense += 2 * d if m.qk_layernorm else 0
    if m.num_experts:
        return dense + m.num_experts * h, m.num_experts * 3 * h * m.expert_ffn_hidden_size  # router; experts
    return dense + 3 * h * f, 0


def stage_parameter_split(cfg: LongPOConfig, stage: int) -> tuple[int, int]:
    """(non-expert, expert) parameters held by pipeline stage ``stage``: its layers, the embedding
    on the first stage, the output layer (a tied embedding's copy) and final norm on the last."""
    m, p = cfg.model, cfg.parallel
    pp = p.pipeline_model_parallel_size
    layers = sum(pipeline_stage_layers(m.num_layers, p)[stage])
    vh = padded_vocab_size(m, p.tensor_model_parallel_size) * m.hidden_size
    dense, experts = _layer_params(cfg)
    n = layers * dense
    if stage == 0:
        n += vh
    if stage == pp - 1:
        n += vh + m.hidden_size
    return n, layers * experts


def stage_parameter_count(cfg: LongPOConfig, stage: int) -> int:
    return sum(stage_parameter_split(cfg, stage))


def micro_batches_per_step(cfg: LongPOConfig, world_size: int) -> int:
    p, t = cfg.parallel, cfg.training
    dp = max(1, world_size // (p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size))
    return max(1, t.global_batch_size // (t.micro_batch_size * dp))


def in_flight_chunks(pp: int, vpp: int, stage: int, num_microbatches: int) -> int:
    """Micro-batch chunks whose activations stage ``stage`` holds at the peak (Megatron's warm-up
    counts: 1F1B pp - stage; interleaved (pp - stage - 1) * 2 + (vpp - 1) * pp + 1), capped by the
    step's micro-batches (x vpp chunks)."""
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp - stage, num_microbatches)
    return min((pp - stage - 1) * 2 + (vpp - 1) * pp + 1, num_microbatches * vpp)


def pipeline_bubble(pp: int, vpp: int, num_microbatches: int) -> float:
    """Idle fraction of the ideal step time: (pp - 1) / (vpp * M) (1F1B: vpp = 1)."""
    return (pp - 1) / (vpp * max(1, num_microbatches))


def resolve_dispatcher(choice: str) -> str:
    """The GPU run's MoE dispatcher (``auto`` is alltoall on CUDA; models/provider.py)."""
    return "alltoall" if choice == "auto" else choice


def estimate_memory(cfg: LongPOConfig, world_size: int, seq_tokens: int | None = None) -> MemoryEstimate:
    """Peak-ish memory of one GPU for a micro-batch of ``seq_tokens`` laid-out tokens per row:
    with pipeline parallelism, of the stage that needs the most.

    ``seq_tokens`` defaults to ``data.max_seq_length``; with ``two_sequences`` a micro-batch has
    2 rows per pair, with ``shared_prefix`` one.
    """
    pp = cfg.parallel.pipeline_model_parallel_size
    return max((_stage_memory(cfg, world_size, seq_tokens, r) for r in range(pp)), key=lambda e: e.total)


def _stage_memory(cfg: LongPOConfig, world_size: int, seq_tokens: int | None, stage: int) -> MemoryEstimate:
    m, p = cfg.model, cfg.parallel
    tp, cp, pp = p.tensor_model_parallel_size, p.context_parallel_size, p.pipeline_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    dp = max(1, world_size // (tp * cp * pp))
    s = seq_tokens or cfg.data.max_seq_length
    rows = cfg.training.micro_batch_size * rows_per_pair(cfg.data.pair_layout)
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = m.num_query_groups * m.head_dim
    dense, experts = stage_parameter_split(cfg, stage) if pp > 1 else parameter_split(cfg)
    n = dense + experts
    layers = sum(pipeline_stage_layers(m.num_layers, p)[stage])
    last = stage == pp - 1
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
    # Stored activations (training.recompute_*, :func:`stored_per_token_per_layer`) for every
    # micro-batch (chunk) in flight on this stage, each holding 1/vpp of the stage's layers.
    flight = in_flight_chunks(pp, vpp, stage, micro_batches_per_step(cfg, world_size))
    per_chunk = layers // vpp
    stored = flight * per_chunk * rows * s_local * act_bytes * stored_per_token_per_layer(cfg, per_chunk)
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
    logprob = chunk * vocab_local * 4 * 2 if last else 0  # logits + their softmax grad in backward
    total = weights + grads + optimizer + stored + working + kv_buf + logprob + dispatch
    return MemoryEstimate(parameter_count(cfg), weights, grads, optimizer, int(stored), working, kv_buf, logprob,
                          int(total), s, recompute_label(cfg), stage=stage, pipeline_stages=pp, in_flight=flight,
                          stage_params=n, expert_params=experts, moe_dispatch=dispatch)


# Activation elements autograd keeps per token of one layer, by tensor ([s, b, x] tensors; x/tp
# for TP-sharded ones, and h-sized ones /tp too with sequence parallelism). CUDA path: fused
# bias-SwiGLU (keeps fc1's output only), flash-class attention (keeps q, k, v, out, lse).
def saved_per_token(cfg: LongPOConfig) -> dict[str, float]:
    """Elements kept per token (per CP-local row position) of one layer without recompute."""
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    h_div = tp if p.sequence_parallel else 1
    q, kv, f = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim, m.ffn_hidden_size
    return {
        "layer_input": m.hidden_size / h_div,  # input_layernorm's input (the residual stream)
        "layernorm": 2 * m.hidden_size / h_div,  # both norm outputs (QKV and fc1 inputs)
        "core_attn": (q + 2 * kv + q) / tp,  # q, k, v after RoPE; attention output (= proj input)
        "mlp_residual": m.hidden_size / h_div,  # pre_mlp_layernorm's input
        "mlp": 3 * f / tp,  # fc1 output (2f, SwiGLU input), SwiGLU output (fc2 input)
    }


def chunk_layers(cfg: LongPOConfig) -> int:
    """Layers of one model chunk (a pipeline stage, or a virtual stage under VPP; the whole model
    without PP): Megatron applies recompute_method / recompute_num_layers per chunk."""
    p = cfg.parallel
    return max(1, cfg.model.num_layers // (p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)))


def stored_per_token_per_layer(cfg: LongPOConfig, layers: Optional[int] = None) -> float:
    """Elements per token per layer kept between forward and backward, averaged over the layers,
    under ``training.recompute_*``."""
    t = cfg.training
    parts = saved_per_token(cfg)
    every = sum(parts.values())
    layers = layers or chunk_layers(cfg)
    if t.recompute_granularity == "full":
        if t.recompute_method == "block":  # the first n layers recomputed, the rest keep everything
            n = min(t.recompute_num_layers, layers)
            return (n * parts["layer_input"] + (layers - n) * every) / layers
        return parts["layer_input"] * math.ceil(layers / t.recompute_num_layers) / layers  # one input per unit
    if t.recompute_granularity == "selective":
        mods = set(t.recompute_modules)
        dropped = (parts["layernorm"] if "layernorm" in mods else 0) + (parts["mlp"] if "mlp" in mods else 0)
        # core_attn recompute keeps q, k, v as the checkpoint's inputs and the output as proj's input
        # (flash-class kernels keep no [s, s] scores): it saves nothing here.
        return every - dropped
    return every


def recompute_label(cfg: LongPOConfig) -> str:
    t = cfg.training
    if t.recompute_granularity == "full":
        return f"full/{t.recompute_method}/{t.recompute_num_layers}"
    if t.recompute_granularity == "selective":
        return "selective/" + "+".join(sorted(t.recompute_modules))
    return "no recompute"


def recompute_forward_fraction(cfg: LongPOConfig, seq_tokens: Optional[int] = None) -> float:
    """Extra forward work of the recompute as a fraction of the layers' forward FLOPs (a causal row
    of ``seq_tokens``): 1 for full recompute of every layer."""
    t, m = cfg.training, cfg.model
    if t.recompute_granularity == "full":
        layers = chunk_layers(cfg)
        return min(t.recompute_num_layers, layers) / layers if t.recompute_method == "block" else 1.0
    if t.recompute_granularity != "selective":
        return 0.0
    s = seq_tokens or cfg.data.max_seq_length
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    # per token: QKV + proj, attention (a causal row: (s+1)/2 keys per query), SwiGLU MLP (flops.py)
    linear, attn, mlp = 2 * h * (q + 2 * kv) + 2 * q * h, 4 * q * (s + 1) / 2, 6 * h * f
    mods = set(t.recompute_modules)
    extra = (attn if "core_attn" in mods else 0) + (mlp if "mlp" in mods else 0)  # norms: ~0 FLOPs
    return extra / (linear + attn + mlp)


def recompute_choices(cfg: LongPOConfig) -> list[LongPOConfig]:
    """The recompute settings the estimator compares, fastest first (ties: less memory first)."""
    layers = chunk_layers(cfg)

    def with_(granularity, method="uniform", n=1, modules=()):
        return replace(cfg, training=replace(cfg.training, recompute_granularity=granularity, recompute_method=method,
                                             recompute_num_layers=n, recompute_modules=list(modules)))

    options = [with_(None), with_("selective", modules=["layernorm"]), with_("selective", modules=["mlp"]),
               with_("selective", modules=["layernorm", "mlp"])]
    options += [with_("full", "block", n) for n in range(1, layers)]
    options.append(with_("full", "uniform", 1))
    options = [o for o in options if not (o.training.recompute_granularity == "selective" and _layernorm_fp8_delayed(o))]
    return sorted(options, key=lambda o: (recompute_forward_fraction(o), stored_per_token_per_layer(o)))


def _layernorm_fp8_delayed(cfg: LongPOConfig) -> bool:
    """Megatron-Core 0.16.1 refuses layernorm recompute with the FP8 delayed recipe."""
    return bool(cfg.parallel.fp8) and cfg.parallel.fp8_recipe == "delayed" and "layernorm" in cfg.training.recompute_modules


def cheapest_recompute(cfg: LongPOConfig, world_size: int, gpu_memory_gib: float = 80.0,
                       margin_gib: float = 8.0) -> Optional[LongPOConfig]:
    """The fastest recompute choice whose estimate leaves ``margin_gib`` free (None: none fits)."""
    for option in recompute_choices(cfg):
        if estimate_memory(option, world_size).total / GiB <= gpu_memory_gib - margin_gib:
            return option
    return None


def estimate_step_seconds(cfg: LongPOConfig, world_size: int, tflops_per_gpu: float, seq_tokens: int | None = None,
                          shared_prefix_response_tokens: int = 4096) -> float:
    """Seconds per optimizer step at an assumed sustained model TFLOP/s per GPU (while busy: a
    pipeline adds its bubble, :func:`pipeline_bubble`).

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
    # Recompute adds a part of one forward of the layers (full recompute: 4/3 of model FLOPs).
    flops *= 1.0 + recompute_forward_fraction(cfg, s) / 3.0
    p = cfg.parallel
    bubble = pipeline_bubble(p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1,
                             micro_batches_per_step(cfg, world_size))
    return flops * (1.0 + bubble) / (world_size * tflops_per_gpu * 1e12)


def tp_collective_bytes(cfg: LongPOConfig, world_size: int, seq_tokens: Optional[int] = None) -> float:
    """Bytes each GPU moves per optimizer step in the TP (sequence-parallel) collectives, which
    this project does not overlap (no tp_comm_overlap): per layer an all-gather before QKV and fc1
    and a reduce-scatter after proj and fc2 in the forward, the same four in the backward, and the
    forward's again for the recomputed share. A ring moves (tp-1)/tp of the full tensor per GPU."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    if tp == 1:
        return 0.0
    dp = max(1, world_size // (tp * cp * p.pipeline_model_parallel_size))
    s = seq_tokens or cfg.data.max_seq_length
    rows = t.micro_batch_size * rows_per_pair(cfg.data.pair_layout)
    act_bytes = 2 if m.params_dtype == "bf16" else 4
    tensor = rows * (s // cp) * m.hidden_size * act_bytes  # [s/cp, rows, h] gathered
    per_layer = (8 + 4 * recompute_forward_fraction(cfg, s)) * tensor * (tp - 1) / tp
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    return m.num_layers / p.pipeline_model_parallel_size * per_layer * micro_batches  # this stage's layers
