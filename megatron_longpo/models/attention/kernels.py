"""Attention kernels for one block: lower-right causal attention over concatenated keys.

Shapes: q [n, h, Lq, d], k/v [n, g, Lk, d] with Lk >= Lq and h % g == 0 (GQA); returns
[n, h, Lq, d]. Query i sees keys 0 .. Lk-Lq+i (the block plan guarantees this is the right set).

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.
  Square blocks use ``is_causal=True`` (flash/efficient/cuDNN on CUDA, the flash CPU kernel on
  CPU). Non-square blocks on CUDA use ``causal_lower_right`` (flash, or memory-efficient for fp32),
  which never materialises a mask. On CPU a non-square block passes a boolean [Lq, Lk] mask to the
  CPU flash kernel (Lq is at most one zigzag chunk, S / 2cp; CPU runs are for tests and the demo,
  not for long contexts); the block is recomputed in backward so the mask is never kept.
- ``flash``: flash-attn 2 (``flash_attn_func``, causal = bottom-right aligned since 2.1), CUDA only.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)


def _expand_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    rep = heads // k.shape[1]
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def sdpa_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Lower-right causal attention with torch SDPA (see module docstring for kernel choice)."""
    lq, lk = q.shape[-2], k.shape[-2]
    if lk < lq:
        raise ValueError(f"block has fewer keys ({lk}) than queries ({lq})")
    gqa = q.shape[1] != k.shape[1]
    if lq == lk:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=gqa
        )
    if q.is_cuda:
        from torch.nn.attention.bias import causal_lower_right

        if gqa and q.dtype not in _HALF:
            # fp32 runs go to the memory-efficient kernel, whose lower-right entry point takes
            # equal head counts; bf16/fp16 go to flash, which handles GQA natively.
            k, v = _expand_kv(k, v, q.shape[1])
            gqa = False
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(lq, lk), scale=scale, dropout_p=dropout_p, enable_gqa=gqa
        )
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # The CPU kernel keeps its (float) mask for backward: recompute this block instead.
        return torch.utils.checkpoint.checkpoint(_cpu_masked, q, k, v, scale, dropout_p, gqa, use_reentrant=False)
    return _cpu_masked(q, k, v, scale, dropout_p, gqa)


def _cpu_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float, gqa: bool) -> torch.Tensor:
    lq, lk = q.shape[-2], k.shape[-2]
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)


def flash_attn_available() -> bool:
    """flash-attn >= 2.1 (bottom-right causal alignment) imports and CUDA is usable."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn
    except Exception:
        return False
    try:
        major, minor = (int(x) for x in flash_attn.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 1)


def flash_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Lower-right causal attention with flash-attn 2 (GQA native, bshd layout)."""
    from flash_attn import flash_attn_func

    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, softmax_scale=scale, causal=True,
    )  # [n, Lq, h, d]
    return out.transpose(1, 2)


KERNELS: dict[str, KernelFn] = {"sdpa": sdpa_lower_right, "flash": flash_lower_right}
