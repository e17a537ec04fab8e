"""Attention kernels for one block: lower-right causal attention over concatenated keys.

Shapes: q [n, h, Lq, d], k/v [n, g, Lk, d] with Lk >= Lq and h % g == 0 (GQA); returns
[n, h, Lq, d]. Query i sees keys 0 .. Lk-Lq+i (the block plan guarantees this is the right set).

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; :func:`choose_sdpa` decides,
  per block, the mask form, whether K/V heads are expanded and which fused CUDA backends are
  allowed (never the math kernel). Square blocks use ``is_causal=True`` (flash/efficient on CUDA,
  the flash CPU kernel on CPU). Non-square blocks on CUDA use ``causal_lower_right`` (flash, or
  memory-efficient for fp32), which never materialises a mask. On CPU a non-square block passes a boolean [Lq, Lk] mask to the
  CPU flash kernel (Lq is at most one zigzag chunk, S / 2cp; CPU runs are for tests and the demo,
  not for long contexts); the block is recomputed in backward so the mask is never kept.
- ``flash``: flash-attn 2 (``flash_attn_func``, causal = bottom-right aligned since 2.1), CUDA only.
- ``cudnn``: Transformer Engine's ``DotProductAttention`` with ``attn_mask_type=causal_bottom_right``
  (cuDNN fused attention on Hopper), CUDA + TE only.
- ``fa3``: FlashAttention-3 (``flash_attn_interface.flash_attn_func``, causal = bottom-right),
  Hopper + a source build of flash-attention/hopper only.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)


def _expand_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    rep = heads // k.shape[1]
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


@dataclass(frozen=True)
class SdpaChoice:
    """How one block calls SDPA (pure decision, see :func:`choose_sdpa`).

    ``mask``: ``causal`` (is_causal, square), ``lower_right`` (CausalBias, CUDA non-square) or
    ``dense`` (boolean mask; CPU non-square only). ``expand_kv``: repeat K/V heads to the query
    heads (a fused kernel that takes no GQA). ``backends``: the SDPA backends allowed on CUDA
    (``sdpa_kernel``); the math backend is never among them, so a shape no fused kernel takes
    fails loudly instead of building a [b, h, Lq, Lk] matrix. Empty on CPU (tests, demo).
    """

    mask: str
    expand_kv: bool
    backends: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{'+'.join(self.backends) or 'cpu'}/{self.mask}{'/expand_kv' if self.expand_kv else ''}"


def choose_sdpa(device_type: str, dtype: torch.dtype, gqa: bool, square: bool, head_dim: int) -> SdpaChoice:
    """The SDPA call for a block; no CUDA choice can reach the math kernel.

    CUDA facts (PyTorch >= 2.5 ``sdp_utils``): flash takes fp16/bf16, head dim <= 256 and a
    multiple of 8, native GQA (``enable_gqa``) and both causal alignments; memory-efficient
    takes fp32 too and lower-right causal masks but not ``enable_gqa``; nothing fused takes fp32
    GQA, so fp32 GQA expands K/V (the expanded copy costs Lk*h*d, never Lq*Lk).
    """
    mask = "causal" if square else ("lower_right" if device_type == "cuda" else "dense")
    if device_type != "cuda":
        return SdpaChoice(mask=mask, expand_kv=False, backends=())
    flash_ok = dtype in _HALF and head_dim <= 256 and head_dim % 8 == 0
    if gqa and flash_ok:
        return SdpaChoice(mask=mask, expand_kv=False, backends=("FLASH_ATTENTION",))
    backends = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION") if flash_ok else ("EFFICIENT_ATTENTION",)
    return SdpaChoice(mask=mask, expand_kv=gqa, backends=backends)


# Choices taken since the last reset (the GPU check reports them; counting costs no sync).
KERNEL_CHOICES: Counter = Counter()


def sdpa_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Lower-right causal attention with torch SDPA (kernel per :func:`choose_sdpa`)."""
    lq, lk = q.shape[-2], k.shape[-2]
    if lk < lq:
        raise ValueError(f"block has fewer keys ({lk}) than queries ({lq})")
    gqa = q.shape[1] != k.shape[1]
    choice = choose_sdpa(q.device.type, q.dtype, gqa, lq == lk, q.shape[-1])
    KERNEL_CHOICES[choice.name] += 1
    if choice.expand_kv:
        k, v = _expand_kv(k, v, q.shape[1])
        gqa = False
    if choice.mask == "dense":
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            # The CPU kernel keeps its (float) mask for backward: recompute this block instead.
            return torch.utils.checkpoint.checkpoint(_cpu_masked, q, k, v, scale, dropout_p, gqa, use_reentrant=False)
        return _cpu_masked(q, k, v, scale, dropout_p, gqa)
    if choice.mask == "causal":
        kw: dict = dict(is_causal=True)
    else:
        kw = dict(attn_mask=causal_lower_right(lq, lk))
    with _restricted(choice.backends):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout_p, enable_gqa=gqa, **kw)


def _restricted(backends: tuple[str, ...]):
    if not backends:
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, b) for b in backends])


def _cpu_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float, gqa: bool) -> torch.Tensor:
    lq, lk = q.shape[-2], k.shape[-2]
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)


def flash_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Lower-right causal attention with flash-attn 2 (GQA native, bshd layout)."""
    from flash_attn import flash_attn_func  # optional: flash-attn is a GPU extra (parallel.attention_backend=flash)

    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, softmax_scale=scale, causal=True,
    )  # [n, Lq, h, d]
    return out.transpose(1, 2)


def fa3_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Lower-right causal attention with FlashAttention-3 (Hopper; ``flash_attn_interface``)."""
    from flash_attn_interface import flash_attn_func  # optional: FA3 is built from source (parallel.attention_backend=fa3)

    if dropout_p:
        raise ValueError("parallel.attention_backend=fa3 has no attention dropout; use sdpa or cudnn")
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True)
    if isinstance(out, tuple):  # FA3 releases differ: out, or (out, softmax_lse)
        out = out[0]
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _te_attention(heads: int, groups: int, head_dim: int, scale: float, dropout_p: float) -> torch.nn.Module:
    """One TE DotProductAttention per shape: bottom-right causal, bshd, no learned state."""
    from transformer_engine.pytorch import DotProductAttention  # optional: TE is the gpu extra (parallel.attention_backend=cudnn)

    return DotProductAttention(num_attention_heads=heads, kv_channels=head_dim, num_gqa_groups=groups,
                               attention_dropout=dropout_p, qkv_format="bshd",
                               attn_mask_type="causal_bottom_right", softmax_scale=scale)


def cudnn_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Lower-right causal attention with TE's DotProductAttention (``causal_bottom_right``): cuDNN
    fused attention on H100 (TE picks its flash backend instead when flash-attn is installed and
    faster; NVTE_* variables are left to Megatron, gpu_rules.nvte_env_errors)."""
    n, h, lq, d = q.shape
    te_attn = _te_attention(h, k.shape[1], d, float(scale), float(dropout_p))
    out = te_attn(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
    return out.reshape(n, lq, h, d).transpose(1, 2)  # [n, Lq, h*d] -> [n, h, Lq, d]


KERNELS: dict[str, KernelFn] = {"sdpa": sdpa_lower_right, "flash": flash_lower_right, "cudnn": cudnn_lower_right,
                                "fa3": fa3_lower_right}
