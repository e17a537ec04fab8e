"""Tiny random HF checkpoints (built with transformers) and a local BPE tokenizer, for tests.

Every weight is randomised, norms and biases included, so swapping any two tensors of the same
shape changes the logits. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from megatron_longpo.architectures import ARCHITECTURES

# family (megatron_longpo/architectures.py) -> (transformers config class name, kwargs). Head ratios
# 1, 2, 4 and 7; tied and untied; Qwen2 QKV bias; Qwen3 q/k norm and explicit head_dim; llama3 rope
# scaling; MoE with and without top-k renormalisation.
TINY_HF: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )),
    "mistral": ("MistralConfig", dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, sliding_window=None,
        rope_theta=1e6, tie_word_embeddings=False,
    )),
    "qwen2": ("Qwen2Config", dict(
        vocab_size=270, hidden_size=112, intermediate_size=192, num_hidden_layers=2, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True,
    )),
    "qwen3": ("Qwen3Config", dict(  # q/k norm, head_dim 24 != 64 / 4, tied
        vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True,
    )),
    "qwen3_moe": ("Qwen3MoeConfig", dict(  # 4 experts top-2, norm_topk_prob false, untied
        vocab_size=260, hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=False,
    )),
    "mixtral": ("MixtralConfig", dict(  # 4 experts top-2 (renormalised), GQA 4
        vocab_size=280, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
    )),
}

CORPUS = [
    "LongPO aligns long-context models with their own short-context preferences.",
    "The quick brown fox jumps over the lazy dog while the model reads a long document.",
    "Megatron-Core shards attention heads and MLP columns over tensor-parallel ranks.",
    "Rotary position embeddings rotate query and key halves by position-dependent angles.",
] * 4


def hf_config(name: str, **overrides: Any):
    cls_name, kw = TINY_HF[name]
    return getattr(transformers, cls_name)(**{**kw, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (norm weights around 1) so every tensor influences the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def save_tiny_tokenizer(out: Path, vocab_size: int = 200) -> None:
    """A byte-level BPE trained on a few sentences, saved as an HF fast tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))


def build_tiny_hf(
    out: str | Path,
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: Optional[str] = None,
    legacy_config: bool = False,
    seed: int = 0,
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Save a tiny random ``name`` model (see TINY_HF, ``overrides`` applied) with transformers to ``out``.

    ``legacy_config`` rewrites config.json in the transformers 4.x layout (``rope_theta`` /
    ``rope_scaling`` / ``torch_dtype``) that most hub checkpoints still use.
    """
    out = Path(out)
    cfg = hf_config(name, **overrides)
    cls = ARCHITECTURES[name].hf_class
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(cfg)
    randomize_(model, seed)
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kw)
    if legacy_config:
        path = out / "config.json"
        d = json.loads(path.read_text())
        rp = d.pop("rope_parameters")
        d["rope_theta"] = rp.pop("rope_theta")
        d["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
        d["torch_dtype"] = d.pop("dtype", str(dtype).replace("torch.", ""))
        path.write_text(json.dumps(d, indent=2))
    if tokenizer:
        save_tiny_tokenizer(out, vocab_size=min(200, cfg.vocab_size))
    return out


@torch.no_grad()
def hf_reference_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [b, s, V] of the HF model in ``hf_dir`` (eager attention)."""
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    return model.eval()(input_ids=tokens, use_cache=False).logits.float()
