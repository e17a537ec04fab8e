"""Check a conversion by running HF transformers and the Megatron model on the same tokens.

Both models run in fp32 on the same weights: the HF model is loaded in the checkpoint's storage
dtype and upcast, the Megatron model's weights are rounded through that dtype, so the logit
difference measures the two implementations, not the bf16 rounding of the conversion. The HF
logits are computed and the HF model freed before the Megatron model is built, so the peak is
one fp32 model (4 bytes per parameter).
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from megatron_longpo.checkpoint import load_model_checkpoint
from megatron_longpo.config import ModelConfig, ParallelConfig
from megatron_longpo.models.provider import build_model
from megatron_longpo.runtime.capabilities import device

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    batch: int
    seq_len: int
    vocab_size: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        return (
            f"verify: max |logit diff| HF vs Megatron = {self.max_abs_diff:.3e} over {self.batch}x{self.seq_len} "
            f"tokens x {self.vocab_size} vocab (max |logit| {self.max_abs_logit:.2f}), tolerance "
            f"{self.tolerance:.1e}: {'OK' if self.ok else 'FAILED'}"
        )


def random_tokens(vocab_size: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens: torch.Tensor, weights_dtype: str) -> torch.Tensor:
    """fp32 logits [b, s, V] of the HF model whose weights are stored/rounded as ``weights_dtype``."""
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=DTYPES[weights_dtype], attn_implementation="eager")
    model = model.float().eval()
    out = model(input_ids=tokens, use_cache=False).logits.float()
    del model
    gc.collect()
    return out


@torch.no_grad()
def megatron_logits(ckpt_dir: str | Path, model_cfg: ModelConfig, tokens: torch.Tensor, weights_dtype: str) -> torch.Tensor:
    """fp32 logits [b, s, V] (true vocabulary) of the checkpoint at TP=1; needs the TP=1 runtime."""
    cfg = dataclasses.replace(model_cfg, params_dtype="fp32", transformer_impl="local")
    model = build_model(cfg, ParallelConfig())
    load_model_checkpoint(ckpt_dir, model, cfg)
    for p in model.parameters():  # the same rounding the HF side got
        p.data = p.data.to(DTYPES[weights_dtype]).float()
    model.eval()
    t = tokens.to(device())
    pos = torch.arange(t.shape[1], device=t.device).unsqueeze(0).expand_as(t)
    out = model(t, pos, None)[..., : cfg.vocab_size].float().cpu()  # [b, s, V]
    del model
    gc.collect()
    return out


def coarser(a: str, b: str) -> str:
    """The lower-precision of two storage dtypes (the one both models can hold exactly)."""
    return a if a in ("bf16", "fp16") else b


def verify(
    hf_dir: str | Path,
    ckpt_dir: str | Path,
    model_cfg: ModelConfig,
    *,
    weights_dtype: str,
    tolerance: float = 1e-3,
    batch: int = 2,
    seq_len: int = 64,
    seed: int = 0,
) -> VerifyResult:
    tokens = random_tokens(model_cfg.vocab_size, batch, seq_len, seed)
    ref = hf_logits(hf_dir, tokens, weights_dtype)
    got = megatron_logits(ckpt_dir, model_cfg, tokens, weights_dtype)
    if ref.shape != got.shape:
        raise RuntimeError(f"logit shapes differ: HF {tuple(ref.shape)} vs Megatron {tuple(got.shape)}")
    return VerifyResult(
        max_abs_diff=float((ref - got).abs().max()),
        max_abs_logit=float(ref.abs().max()),
        tolerance=tolerance,
        batch=batch,
        seq_len=seq_len,
        vocab_size=model_cfg.vocab_size,
    )
