"""The model families: one spec per Hugging Face architecture class (torch-free, layer 0).

Everything the project knows about a family lives in its :class:`Architecture` entry:

- feature flags (QKV bias, q/k RMSNorm, an explicit ``head_dim`` in config.json, how the family
  spells a sliding window, which rope scaling kinds Megatron-Core can express, MoE fields);
- the parameter template: every HF tensor of the model with its Megatron parameter, its shape in
  symbols and how it sits in the Megatron tensor (whole, a slice of the per-group fused QKV, a half
  of the gated fc1). ``{i}`` stands for the layer, ``{e}`` for the expert.

Config checks (config.validate_model), the model provider (models/provider.py), the HF <-> Megatron
map and shapes (convert/mapping.py), HF config.json reading/writing (convert/hf_config.py) and the
test helpers' family list (testing/) derive from this table. Adding a family is one entry here
plus its tests.

Shape symbols: ``h`` hidden, ``f`` dense ffn, ``m`` expert ffn, ``d`` head dim, ``q`` heads * d,
``kv`` groups * d, ``V`` vocabulary, ``E`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

Part = Literal["whole", "q", "k", "v", "gate", "up"]


@dataclass(frozen=True)
class Param:
    """One HF tensor and where it goes in Megatron (TP=1, EP=1 layout)."""

    hf: str
    megatron: str
    shape: tuple[str, ...]  # HF shape in symbols (module docstring)
    part: Part = "whole"  # q/k/v: rows of the per-query-group fused QKV; gate/up: halves of fc1
    when: str = ""  # ModelConfig flag that must be true ("add_qkv_bias", "qk_layernorm"), or "untied"


@dataclass(frozen=True)
class MoE:
    """How a family's config.json spells its mixture-of-experts fields."""

    experts: tuple[str, ...]  # field(s) holding the expert count (first present wins)
    topk: str  # experts per token
    ffn: str  # expert intermediate size
    norm_topk_prob: Optional[str]  # field: renormalise the top-k probabilities; None = always (Mixtral)
    # field -> value(s) the Megatron MoE layer reproduces; anything else is refused at conversion
    must_be: tuple[tuple[str, tuple], ...] = ()


# Fields of config.json the families share; the MoE ones are refused unless exactly as listed.
_QWEN3_MOE_MUST = (
    ("decoder_sparse_step", (1, None)),
    ("mlp_only_layers", ([], None)),
    ("shared_expert_intermediate_size", (0, None)),
    ("router_jitter_noise", (0, 0.0, None)),
    ("use_sliding_window", (False, None)),
)
_MIXTRAL_MUST = (("router_jitter_noise", (0, 0.0, None)),)

L = "model.layers.{i}."
M = "decoder.layers.{i}."

_ATTENTION = (
    Param(L + "input_layernorm.weight", M + "input_layernorm.weight", ("h",)),
    Param(L + "self_attn.q_proj.weight", M + "self_attention.linear_qkv.weight", ("q", "h"), "q"),
    Param(L + "self_attn.k_proj.weight", M + "self_attention.linear_qkv.weight", ("kv", "h"), "k"),
    Param(L + "self_attn.v_proj.weight", M + "self_attention.linear_qkv.weight", ("kv", "h"), "v"),
    Param(L + "self_attn.q_proj.bias", M + "self_attention.linear_qkv.bias", ("q",), "q", "add_qkv_bias"),
    Param(L + "self_attn.k_proj.bias", M + "self_attention.linear_qkv.bias", ("kv",), "k", "add_qkv_bias"),
    Param(L + "self_attn.v_proj.bias", M + "self_attention.linear_qkv.bias", ("kv",), "v", "add_qkv_bias"),
    Param(L + "self_attn.q_norm.weight", M + "self_attention.q_layernorm.weight", ("d",), when="qk_layernorm"),
    Param(L + "self_attn.k_norm.weight", M + "self_attention.k_layernorm.weight", ("d",), when="qk_layernorm"),
    Param(L + "self_attn.o_proj.weight", M + "self_attention.linear_proj.weight", ("h", "q")),
    Param(L + "post_attention_layernorm.weight", M + "pre_mlp_layernorm.weight", ("h",)),
)
_DENSE_MLP = (
    Param(L + "mlp.gate_proj.weight", M + "mlp.linear_fc1.weight", ("f", "h"), "gate"),
    Param(L + "mlp.up_proj.weight", M + "mlp.linear_fc1.weight", ("f", "h"), "up"),
    Param(L + "mlp.down_proj.weight", M + "mlp.linear_fc2.weight", ("h", "f")),
)


def _moe_mlp(block: str, gate: str, up: str, down: str) -> tuple[Param, ...]:
    """Router + experts on Megatron-Core's MoELayer (local spec: SequentialMLP experts)."""
    x = M + "mlp.experts.local_experts.{e}."
    return (
        Param(L + f"{block}.gate.weight", M + "mlp.router.weight", ("E", "h")),
        Param(L + f"{block}.experts.{{e}}.{gate}.weight", x + "linear_fc1.weight", ("m", "h"), "gate"),
        Param(L + f"{block}.experts.{{e}}.{up}.weight", x + "linear_fc1.weight", ("m", "h"), "up"),
        Param(L + f"{block}.experts.{{e}}.{down}.weight", x + "linear_fc2.weight", ("h", "m")),
    )


EMBEDDING = (Param("model.embed_tokens.weight", "embedding.word_embeddings.weight", ("V", "h")),)
HEAD = (
    Param("model.norm.weight", "decoder.final_layernorm.weight", ("h",)),
    Param("lm_head.weight", "output_layer.weight", ("V", "h"), when="untied"),
)


@dataclass(frozen=True)
class Architecture:
    arch: str  # ModelConfig.arch
    hf_class: str
    model_type: str
    layer: tuple[Param, ...]  # per-layer template (``{i}`` layer, ``{e}`` expert)
    qkv_bias: bool = False  # q/k/v biases, always present (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    head_dim_field: bool = False  # config.json carries head_dim
    # none: no window; global: one ``sliding_window`` for all layers (Mistral, Mixtral);
    # layers: ``use_sliding_window`` + ``max_window_layers`` / ``layer_types`` (Qwen2, Qwen3)
    sliding_window: Literal["none", "global", "layers"] = "none"
    attention_bias_field: bool = False  # config.json has ``attention_bias`` (which also adds an o_proj bias)
    rope_scaling: tuple[str, ...] = ()  # rope_type values Megatron-Core's GPTModel implements
    moe: Optional[MoE] = None
    fresh: dict = field(default_factory=dict)  # config.json fields of an export without a source config

    def params(self) -> tuple[Param, ...]:
        """Embedding, the per-layer template, head: every parameter the family can have."""
        return EMBEDDING + self.layer + HEAD


ARCHITECTURES: dict[str, Architecture] = {
    a.arch: a
    for a in (
        Architecture(
            "llama", "LlamaForCausalLM", "llama", _ATTENTION + _DENSE_MLP,
            attention_bias_field=True, rope_scaling=("llama3",), fresh={"mlp_bias": False, "attention_bias": False},
        ),
        Architecture(
            "mistral", "MistralForCausalLM", "mistral", _ATTENTION + _DENSE_MLP,
            sliding_window="global", head_dim_field=False, fresh={"sliding_window": None},
        ),
        Architecture(
            "qwen2", "Qwen2ForCausalLM", "qwen2", _ATTENTION + _DENSE_MLP,
            qkv_bias=True, sliding_window="layers", fresh={"sliding_window": None, "use_sliding_window": False},
        ),
        Architecture(
            "qwen3", "Qwen3ForCausalLM", "qwen3", _ATTENTION + _DENSE_MLP,
            qk_norm=True, head_dim_field=True, sliding_window="layers", attention_bias_field=True,
            fresh={"sliding_window": None, "use_sliding_window": False, "attention_bias": False},
        ),
        Architecture(
            "qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe",
            _ATTENTION + _moe_mlp("mlp", "gate_proj", "up_proj", "down_proj"),
            qk_norm=True, head_dim_field=True, sliding_window="layers", attention_bias_field=True,
            moe=MoE(("num_experts", "num_local_experts"), "num_experts_per_tok", "moe_intermediate_size",
                    "norm_topk_prob", _QWEN3_MOE_MUST),
            fresh={"sliding_window": None, "use_sliding_window": False, "attention_bias": False,
                   "decoder_sparse_step": 1, "mlp_only_layers": []},
        ),
        Architecture(
            "mixtral", "MixtralForCausalLM", "mixtral",
            _ATTENTION + _moe_mlp("block_sparse_moe", "w1", "w3", "w2"),
            sliding_window="global",
            moe=MoE(("num_local_experts",), "num_experts_per_tok", "intermediate_size", None, _MIXTRAL_MUST),
            fresh={"sliding_window": None, "router_jitter_noise": 0.0},
        ),
    )
}
ARCH_NAMES = tuple(ARCHITECTURES)
BY_HF_CLASS: dict[str, Architecture] = {a.hf_class: a for a in ARCHITECTURES.values()}
BY_MODEL_TYPE: dict[str, Architecture] = {a.model_type: a for a in ARCHITECTURES.values()}


def architecture(arch: str) -> Architecture:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"model.arch={arch!r} is not a known family; choose one of {list(ARCH_NAMES)}") from None
