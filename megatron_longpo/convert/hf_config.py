"""HF ``config.json`` <-> :class:`ModelConfig` for the families of megatron_longpo/architectures.py.

Reads the raw JSON (no transformers import), so it accepts both the transformers 4.x layout
(``rope_theta`` / ``rope_scaling`` / ``torch_dtype``) and the 5.x one (``rope_parameters`` /
``dtype``). Everything Megatron-Core's GPTModel cannot express is rejected here, before any
tensor is read: other architectures, biases outside QKV, non-SiLU activations, effective sliding
windows, partial rotary, every rope scaling except Llama-3's, and MoE fields the Megatron MoE
layer does not reproduce (shared experts, dense layers between sparse ones, router noise).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from megatron_longpo.architectures import ARCHITECTURES, BY_HF_CLASS, BY_MODEL_TYPE, Architecture, MoE
from megatron_longpo.config import ModelConfig

# HF architecture class -> ModelConfig.arch.
SUPPORTED_ARCHITECTURES: dict[str, str] = {a.hf_class: a.arch for a in ARCHITECTURES.values()}

# Megatron's RotaryEmbedding hard-codes these Llama-3 constants; only ``factor`` is a parameter.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

HF_DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file/field and what to do."""


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} not found: --hf-dir must be a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


def hf_architecture(cfg: dict, where: str = "config.json") -> str:
    """The supported HF architecture class of ``cfg`` or a ConversionError listing the supported ones."""
    archs = cfg.get("architectures") or []
    if not archs and cfg.get("model_type") in BY_MODEL_TYPE:
        archs = [BY_MODEL_TYPE[cfg["model_type"]].hf_class]
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{where}: architectures={archs} (model_type={cfg.get('model_type')!r}) is not supported; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return archs[0]


def hf_rope(cfg: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) from either config layout; scaling has no rope_theta key."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ConversionError("config.json: per-layer-type rope_parameters are not supported")
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (params if params else None)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if "type" in scaling and "rope_type" not in scaling:  # transformers < 4.45 spelling
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default" and set(scaling) <= {"rope_type"}:
            scaling = None
    return float(theta), scaling


def _check_rope_scaling(scaling: Optional[dict], spec: Architecture) -> None:
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in spec.rope_scaling:
        raise ConversionError(
            f"config.json: rope scaling {scaling} is not supported for {spec.hf_class}; Megatron-Core's "
            f"GPTModel implements rope_type {list(spec.rope_scaling) or 'none'} for it (or no scaling)"
        )
    for key, want in LLAMA3_FIXED.items():
        if float(scaling.get(key, want)) != want:
            raise ConversionError(
                f"config.json: llama3 rope scaling with {key}={scaling.get(key)} is not supported; "
                f"Megatron-Core fixes {key}={want} (only 'factor' is configurable)"
            )


def hf_to_model_config(cfg: dict, params_dtype: str = "bf16") -> ModelConfig:
    """ModelConfig for an HF config dict of a supported family; ConversionError if unsupported."""
    spec = BY_HF_CLASS[hf_architecture(cfg)]

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ConversionError(f"config.json: required field '{key}' is missing")
        return cfg[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    layers, max_pos = int(need("num_hidden_layers")), int(need("max_position_embeddings"))
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"config.json: hidden_act={act!r} is not supported (only silu / SwiGLU)")
    if cfg.get("mlp_bias"):
        raise ConversionError("config.json: mlp_bias=true is not supported (Megatron model has no MLP biases)")
    if not spec.qkv_bias and cfg.get("attention_bias"):
        raise ConversionError(
            f"config.json: attention_bias=true is not supported for {spec.hf_class} (it also adds an "
            "o_proj bias that the Megatron model does not have)"
        )
    partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise ConversionError(f"config.json: partial_rotary_factor={partial} is not supported (only 1.0)")
    _check_sliding_window(cfg, spec, layers, max_pos)
    theta, scaling = hf_rope(cfg)
    _check_rope_scaling(scaling, spec)
    if heads % groups:
        raise ConversionError(
            f"config.json: num_attention_heads ({heads}) must be divisible by num_key_value_heads ({groups})"
        )
    return ModelConfig(
        arch=spec.arch,  # type: ignore[arg-type]
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=int(need("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=None if head_dim * heads == hidden else head_dim,
        vocab_size=int(need("vocab_size")),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        params_dtype=params_dtype,  # type: ignore[arg-type]
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        **(_moe_fields(cfg, spec.moe) if spec.moe else {}),
    )


def _moe_fields(cfg: dict, moe: MoE) -> dict:
    """ModelConfig MoE fields; refuses every field whose value the Megatron MoE layer does not reproduce."""
    for key, allowed in moe.must_be:
        if cfg.get(key) not in allowed:
            raise ConversionError(
                f"config.json: {key}={cfg.get(key)!r} is not supported (the Megatron MoE layer reproduces "
                f"{key} in {[a for a in allowed if a is not None]} only)"
            )
    experts = next((cfg[k] for k in moe.experts if cfg.get(k) is not None), None)
    if experts is None:
        raise ConversionError(f"config.json: required field '{moe.experts[0]}' is missing")
    for key in (moe.topk, moe.ffn):
        if cfg.get(key) is None:
            raise ConversionError(f"config.json: required field '{key}' is missing")
    norm = True if moe.norm_topk_prob is None else bool(cfg.get(moe.norm_topk_prob, False))
    return dict(num_experts=int(experts), moe_router_topk=int(cfg[moe.topk]),
                moe_ffn_hidden_size=int(cfg[moe.ffn]), moe_norm_topk_prob=norm,
                moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef") or 0.0))


def _check_sliding_window(cfg: dict, spec: Architecture, layers: int, max_pos: int) -> None:
    """Megatron's local/TE causal attention has no sliding window: refuse one that would matter."""
    window = cfg.get("sliding_window")
    if spec.sliding_window == "none":
        return
    if spec.sliding_window == "layers":
        types = cfg.get("layer_types")
        if types is not None:
            sliding = any(t != "full_attention" for t in types)
            field = "layer_types"
        else:
            sliding = bool(cfg.get("use_sliding_window")) and int(cfg.get("max_window_layers", layers)) < layers
            field = "use_sliding_window"
        if not sliding:
            return
        raise ConversionError(
            f"config.json: {field} asks for sliding-window layers (sliding_window={window}), which are not "
            "supported (the Megatron model attends to the whole causal context)"
        )
    if window is not None and int(window) < max_pos:
        raise ConversionError(
            f"config.json: sliding_window={window} < max_position_embeddings={max_pos} is not supported "
            "(the Megatron model attends to the whole causal context); use a checkpoint without a "
            "sliding window (e.g. Mistral-7B-v0.2+) or set sliding_window to null if it was unused"
        )


def model_config_to_hf(model: ModelConfig, base: Optional[dict] = None, dtype: str = "bf16") -> dict:
    """HF config dict for ``model``.

    ``base`` (the source config.json, kept in the checkpoint meta) provides every field the
    ModelConfig does not carry (token ids, transformers version, ...) and its layout (legacy
    ``rope_theta``/``rope_scaling`` or ``rope_parameters``); ModelConfig values win for the fields
    it does carry, so a model trained with a new rope_theta exports with that rope_theta.
    """
    spec = ARCHITECTURES[model.arch]
    if (model.add_qkv_bias, model.qk_layernorm) != (spec.qkv_bias, spec.qk_norm):
        raise ConversionError(
            f"model.add_qkv_bias={model.add_qkv_bias}, model.qk_layernorm={model.qk_layernorm} cannot be "
            f"exported as {spec.hf_class} (it has qkv bias={spec.qkv_bias}, qk-norm={spec.qk_norm})"
        )
    out = copy.deepcopy(base) if base else _fresh_hf_config(model)
    out["architectures"] = [spec.hf_class]
    out["model_type"] = spec.model_type
    out.update(
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        vocab_size=model.vocab_size,
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=model.tie_word_embeddings,
    )
    if out.get("head_dim") is not None or model.kv_channels is not None or spec.head_dim_field:
        out["head_dim"] = model.head_dim
    if spec.attention_bias_field:
        out["attention_bias"] = False
    if spec.moe is not None:
        out[next((k for k in spec.moe.experts if k in out), spec.moe.experts[0])] = model.num_experts
        out[spec.moe.topk] = model.moe_router_topk
        out[spec.moe.ffn] = model.expert_ffn_hidden_size
        if spec.moe.norm_topk_prob is not None:
            out[spec.moe.norm_topk_prob] = model.moe_norm_topk_prob
        out["router_aux_loss_coef"] = model.moe_aux_loss_coeff
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = ["full_attention"] * model.num_layers
    if "rope_parameters" in out:
        out["rope_parameters"] = {**(model.rope_scaling or {"rope_type": "default"}), "rope_theta": model.rope_theta}
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
    else:
        out["rope_theta"] = model.rope_theta
        out["rope_scaling"] = copy.deepcopy(model.rope_scaling)
    torch_name = {v: k for k, v in HF_DTYPES.items()}[dtype]
    out["torch_dtype" if "torch_dtype" in out else "dtype"] = torch_name
    return out


def _fresh_hf_config(model: ModelConfig) -> dict:
    cfg: dict[str, Any] = {
        "hidden_act": "silu",
        "initializer_range": model.init_method_std,
        "attention_dropout": model.attention_dropout,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    return {**cfg, **copy.deepcopy(ARCHITECTURES[model.arch].fresh)}
