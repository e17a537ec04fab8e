"""GPTModel provider for the families of megatron_longpo/architectures.py.

``build_model`` turns a :class:`ModelConfig` + :class:`ParallelConfig` into a Megatron-Core
``GPTModel`` (our subclass :class:`LongPOGPTModel`) on the current TP/CP/EP groups:
RMSNorm, SwiGLU, GQA, RoPE (configurable base), optional QKV bias, optional per-head q/k RMSNorm
(Qwen3), dense MLP or Megatron-Core MoE layers (softmax router, top-k, dropless), tied or untied
embeddings, vocab padded to a multiple of ``make_vocab_size_divisible_by * tp``.

The subclass adds a hidden-state forward: final hidden states after the final norm and before
the output layer, so the LongPO loss computes log-probs in chunks and never materialises
[sequence, vocab] logits.

Core attention is chosen by ``parallel.attention_backend`` (models/attention/backend.py): TE
attention, or the project's context-parallel attention (SDPA / flash-attn kernels). With the
project attention, RoPE is computed from the (CP-local) ``position_ids`` the caller passes instead
of Megatron's 0..S-1 table, which is what the shared-prefix layout needs (models/rope.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import layers as mcore_tp_layers
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longpo.config import ConfigError, ModelConfig, ParallelConfig, padded_vocab_size
from megatron_longpo.gpu_rules import fp8_device_errors
from megatron_longpo.models.attention import ContextParallelAttention, core_attention_class, resolve_attention_backend
from megatron_longpo.models.norm import RMSNorm
from megatron_longpo.models.rope import install_bounded_rope_cache, rope_from_module
from megatron_longpo.runtime import capabilities


def fusion_settings(on_cuda: bool, impl: str, te_attention: bool, ddp: bool = True) -> dict[str, bool]:
    """Megatron fusion flags valid for this run (pure; tests/unit/test_gpu_rules.py).

    - bias_activation_fusion (bias-SwiGLU) and bias_dropout_fusion: torch-compiled kernels, valid
      on any CUDA run; CPU keeps the unfused path (same math) so tests run the reference ops.
    - apply_rope_fusion: TE's fused RoPE kernel, only with the TE spec AND TE attention; the project
      attention passes per-row angles [s, b, 1, d] (shared-prefix positions), which the fused
      kernel does not take.
    - gradient_accumulation_fusion: TE linears accumulate wgrad into main_grad natively (no apex),
      so on with CUDA + TE, for a model that Megatron DDP wraps (``ddp``: the fused wgrad writes
      into ``param.main_grad``, which DDP creates). GPTModel's output layer is a local
      ColumnParallelLinear that refuses the flag without apex's extension; the project never runs
      its forward (log-probs use its weight), so :func:`build_model` builds it with the fusion off
      (:func:`_output_layer_without_wgrad_fusion`).
    - masked_softmax_fusion / persist_layer_norm: only used by Megatron's local
      DotProductAttention / apex LayerNorm, which this project never builds: off.
    """
    te = on_cuda and impl == "transformer_engine"
    return dict(
        bias_activation_fusion=on_cuda,
        bias_dropout_fusion=on_cuda,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=te and te_attention,
        gradient_accumulation_fusion=te and ddp,
    )


def batch_p2p_comm(parallel: ParallelConfig) -> bool:
    """Megatron's batched p2p exchange, except for interleaved PP=2 (measured, docs/cpu_compat.md).

    With two stages the previous and the next stage are the same rank, and the interleaved
    schedule's steady state sends an activation AND a gradient to it in one batch: the batched
    ops match them to the peer's receives in posting order ([send_prev, recv_prev, send_next,
    recv_next] on both ranks), which pairs the gradient with the activation receive; same shapes,
    so the swap is silent (the PP=2 x VPP=2 loss was off by 0.2%). Megatron's unbatched path
    sends the two directions of a 2-rank group over two different groups, which keeps them apart.
    """
    return not (parallel.pipeline_model_parallel_size == 2 and parallel.virtual_pipeline_model_parallel_size)


@contextlib.contextmanager
def _output_layer_without_wgrad_fusion(fusion: bool) -> Iterator[None]:
    """Let GPTModel build its local output layer while ``gradient_accumulation_fusion`` is on for
    the TE linears: Megatron-Core 0.16.1 ColumnParallelLinear refuses the flag at construction
    when apex's fused_weight_gradient_mlp_cuda is missing (module flag read in __init__). Scoped to
    the constructor; build_model then turns the flag off on that layer."""
    if not fusion or capabilities.grad_accum_fusion_available():
        yield
        return
    saved = mcore_tp_layers._grad_accum_fusion_available
    mcore_tp_layers._grad_accum_fusion_available = True
    try:
        yield
    finally:
        mcore_tp_layers._grad_accum_fusion_available = saved


def init_tp_comm_overlap(model: ModelConfig, parallel: ParallelConfig, tokens_per_micro_batch: int) -> None:
    """Create TE's userbuffers for parallel.tp_comm_overlap (once per process, before the model):
    one buffer of [tokens per micro-batch / cp, hidden], as Megatron-LM's _initialize_tp_communicators."""
    if not parallel.tp_comm_overlap:
        return
    from transformer_engine.pytorch import module as te_module  # optional: TE userbuffers (parallel.tp_comm_overlap)

    te_module.base.initialize_ub(
        shape=[tokens_per_micro_batch // parallel.context_parallel_size, model.hidden_size],
        tp_size=parallel.tensor_model_parallel_size, use_fp8=parallel.fp8 is not None,
        dtype=params_dtype(model), bootstrap_backend="nccl")


def params_dtype(model: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if model.params_dtype == "bf16" else torch.float32


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
    recompute_modules: Optional[list] = None,
    impl: str = "local",
    te_attention: bool = False,
    ddp: bool = False,
) -> TransformerConfig:
    """Megatron TransformerConfig for this model on this parallel layout.

    ``impl`` (resolved layer implementation), ``te_attention`` and ``ddp`` (the model will be
    wrapped in Megatron DDP) select the valid fusions.
    """
    dtype = params_dtype(model)
    on_cpu = not capabilities.cuda_available()
    fusions = fusion_settings(not on_cpu, impl, te_attention, ddp)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        **fusions,
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        cp_comm_type=parallel.cp_comm_type if parallel.context_parallel_size > 1 else None,
        batch_p2p_comm=batch_p2p_comm(parallel),
    )
    kwargs.update(qk_layernorm=model.qk_layernorm, **moe_settings(model, parallel))
    if recompute_granularity:
        kwargs.update(recompute_granularity=recompute_granularity)
        if recompute_granularity == "full":
            kwargs.update(recompute_method=recompute_method, recompute_num_layers=recompute_num_layers)
        elif recompute_modules:
            if "layernorm" in recompute_modules and not capabilities.te_available():
                # Megatron-Core 0.16.1 CheckpointWithoutOutput() defaults to fp8=False and tests
                # `fp8 is not None`, so it reads TE's FP8 state: layernorm recompute needs TE.
                raise ConfigError("training.recompute_modules=layernorm needs Transformer Engine with CUDA "
                                  "(Megatron-Core 0.16.1); use recompute_modules without layernorm here")
            kwargs.update(recompute_modules=list(recompute_modules))
    if parallel.fp8:
        if impl != "transformer_engine":
            raise ConfigError(
                "parallel.fp8 needs the Transformer Engine layer spec but this run resolved "
                f"model.transformer_impl to local ({capabilities.unavailable_reason('transformer_engine')}); "
                "install Transformer Engine or set parallel.fp8=null"
            )
        errs = fp8_device_errors(parallel, None if on_cpu else torch.cuda.get_device_capability())
        if errs:
            raise ConfigError("; ".join(errs))
        kwargs.update(fp8=parallel.fp8, fp8_recipe=parallel.fp8_recipe)
    if parallel.tp_comm_overlap:
        if impl != "transformer_engine" or on_cpu:
            raise ConfigError("parallel.tp_comm_overlap needs the Transformer Engine layer spec with CUDA "
                              f"({capabilities.unavailable_reason('transformer_engine')}); set parallel.tp_comm_overlap=false")
        kwargs.update(tp_comm_overlap=True)
        if parallel.fp8_recipe == "delayed":
            kwargs.update(fp8_amax_history_len=parallel.fp8_amax_history_len,
                          fp8_amax_compute_algo=parallel.fp8_amax_compute_algo)
    return TransformerConfig(**kwargs)


def resolve_token_dispatcher(choice: str, on_cuda: bool, expert_tp: int) -> str:
    """``auto``: alltoall on CUDA. On CPU (gloo, docs/cpu_compat.md) alltoall at expert-TP 1 (it
    exchanges per-rank token counts, so EP ranks may hold sequences of different lengths);
    allgather at expert-TP > 1, where alltoall all-gathers uneven splits that gloo refuses."""
    if choice != "auto":
        return choice
    return "alltoall" if on_cuda or expert_tp == 1 else "allgather"


def moe_settings(model: ModelConfig, parallel: ParallelConfig) -> dict:
    """TransformerConfig MoE fields reproducing the HF routing (pure).

    HF Mixtral / Qwen3-MoE: softmax over all experts, top-k, then (Mixtral; Qwen3-MoE with
    ``norm_topk_prob``) divide by the top-k sum. Megatron's default (top-k of the logits, softmax
    over those k) is the same renormalised distribution; ``moe_router_pre_softmax`` is the
    un-renormalised one. Dropless (no capacity factor), no jitter, no expert bias, so the routing
    is a deterministic function of the input. The load-balancing loss (Switch style, per layer) is
    on when ``model.moe_aux_loss_coeff > 0``; Megatron attaches its gradient to the router
    probabilities (docs/convert.md, "Mixture of experts").
    """
    if model.num_experts is None:
        return {}
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not model.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_token_dispatcher_type=resolve_token_dispatcher(
            model.moe_token_dispatcher, capabilities.cuda_available(),
            parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size),
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=False,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size,
    )


def layer_spec(model: ModelConfig, impl: str, core_attention: Optional[type] = None,
               num_layers: Optional[int] = None) -> ModuleSpec | TransformerBlockSubmodules:
    """Layer spec: TE modules on CUDA, Megatron local modules + project RMSNorm elsewhere.

    ``core_attention`` replaces DotProductAttention (the project's context-parallel attention).
    ``num_layers``: layers of this pipeline stage / virtual chunk (default: all of the model); the
    TE spec leaves the count to Megatron's block (the same helper).
    """
    if impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=model.num_experts, moe_grouped_gemm=False, qk_layernorm=model.qk_layernorm)
        if core_attention is not None:
            spec.submodules.self_attention.submodules.core_attention = core_attention
        return spec
    spec = get_gpt_layer_local_spec(num_experts=model.num_experts, qk_layernorm=model.qk_layernorm,
                                    normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if model.qk_layernorm:  # per head (hidden_size = head dim), HF q_norm / k_norm
        spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    # Final norm of the block is the project RMSNorm too (SP-capable without apex/TE).
    n = model.num_layers if num_layers is None else num_layers
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=RMSNorm)


class LongPOGPTModel(GPTModel):
    """GPTModel with a hidden-state forward (``return_hidden=True``).

    ``explicit_rope`` (set by :func:`build_model` for the project attention): rotary angles come
    from ``position_ids`` (CP-local, [b, s/cp]) rather than from Megatron's per-CP-rank slice of
    the 0..S-1 table. Without position ids Megatron's table is used.
    """

    explicit_rope: bool = False

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        explicit = self.explicit_rope and position_ids is not None
        table = getattr(self.rotary_pos_emb, "forward", None)
        if explicit and hasattr(table, "bypass"):
            with table.bypass():  # our angles replace Megatron's table: do not build it
                out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        else:
            out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if explicit and hasattr(self, "rotary_pos_emb"):
            if position_ids.shape[1:] != input_ids.shape[1:] or position_ids.shape[0] not in (1, input_ids.shape[0]):
                raise ValueError(
                    f"position_ids {tuple(position_ids.shape)} do not match input_ids {tuple(input_ids.shape)}: "
                    "pass this CP rank's slice of both (PairBatch.for_cp_rank, data/batch.py)"
                )
            position_ids = position_ids.expand_as(input_ids)
            # [s_local, b, 1, rot_dim]: broadcast over heads, per row over the batch.
            out = (out[0], rope_from_module(self.rotary_pos_emb, position_ids)) + tuple(out[2:])
        return out

    def forward(self, input_ids, position_ids, attention_mask, *args, return_hidden: bool = False, **kwargs):
        if not return_hidden:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        return self.forward_hidden(input_ids, position_ids, attention_mask, **kwargs)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,  # [b, s_local]
        position_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Final hidden states [s_local(/tp with SP), b, h] after the final norm."""
        decoder_input, rotary_pos_emb, *_ = self._preprocess(
            input_ids=input_ids, position_ids=position_ids, packed_seq_params=packed_seq_params
        )
        return self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params,
        )

    def output_weight(self) -> torch.Tensor:
        """The vocab-parallel output projection [V/tp, h] (tied to the embedding if shared)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    core_attention: Optional[type] = None,
    pair_layout: str = "two_sequences",
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
    recompute_modules: Optional[list] = None,
    initialize: bool = True,
    ddp: bool = False,
    vp_stage: Optional[int] = None,
) -> LongPOGPTModel:
    """Build this pipeline stage's model on the current Megatron parallel state (call after
    init_model_parallel): the whole model without PP, else only this stage's layers
    (Megatron's ``get_num_layers_to_build``), the embedding on the first stage and the output
    layer on the last (``pre_process`` / ``post_process``). ``vp_stage`` picks the virtual
    chunk under VPP (see :func:`build_model_chunks`).

    ``core_attention`` overrides the attention module; by default it follows
    ``parallel.attention_backend`` for ``pair_layout`` (``data.pair_layout``), failing here when the
    chosen backend cannot run on this machine. ``initialize=False`` leaves the parameters
    uninitialised on the CPU (checkpoint conversion fills them tensor by tensor). ``ddp=True``
    (the trainer, which wraps the model in Megatron DDP) also enables gradient-accumulation fusion
    where it is valid (:func:`fusion_settings`).
    """
    impl = capabilities.resolve_transformer_impl(model.transformer_impl, capabilities.te_available())
    if core_attention is None:
        core_attention = core_attention_class(resolve_attention_backend(parallel, pair_layout, impl),
                                              parallel.cp_kv_gather_chunks)
    cfg = transformer_config(
        model,
        parallel,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        recompute_modules=recompute_modules,
        impl=impl,
        te_attention=core_attention is None,
        ddp=ddp,
    )
    if not initialize:
        cfg = dataclasses.replace(cfg, use_cpu_initialization=True, perform_initialization=False)
    rope_scaling = model.rope_scaling is not None
    if parallel.virtual_pipeline_model_parallel_size and vp_stage is None:
        raise ValueError("parallel.virtual_pipeline_model_parallel_size is set: build with build_model_chunks "
                         "(or pass vp_stage)")
    with _output_layer_without_wgrad_fusion(cfg.gradient_accumulation_fusion):
        gpt = LongPOGPTModel(
            config=cfg,
            transformer_layer_spec=layer_spec(model, impl, core_attention, get_num_layers_to_build(cfg, vp_stage)),
            vocab_size=padded_vocab_size(model, parallel.tensor_model_parallel_size),
            max_sequence_length=model.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
            parallel_output=True,
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=model.rope_theta,
            rope_scaling=rope_scaling,
            rope_scaling_factor=float(model.rope_scaling.get("factor", 8.0)) if rope_scaling else 8.0,
        )
    if cfg.gradient_accumulation_fusion and not capabilities.grad_accum_fusion_available() and gpt.post_process:
        gpt.output_layer.gradient_accumulation_fusion = False  # its forward never runs here; if it did, unfused
    gpt.explicit_rope = isinstance(core_attention, type) and issubclass(core_attention, ContextParallelAttention)
    install_bounded_rope_cache(gpt.rotary_pos_emb)
    return gpt.to(capabilities.device()) if initialize else gpt


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, **kwargs) -> list[LongPOGPTModel]:
    """This PP rank's model chunks: one without VPP, else one per virtual stage (in order), each
    built by :func:`build_model`. Megatron's schedules take this list."""
    vpp = parallel.virtual_pipeline_model_parallel_size
    if not vpp:
        return [build_model(model, parallel, **kwargs)]
    return [build_model(model, parallel, vp_stage=v, **kwargs) for v in range(vpp)]
