"""Which core attention a run uses (parallel.attention_backend x data.pair_layout x hardware)."""

from __future__ import annotations

from typing import Optional

from megatron_longpo.config import ConfigError, ParallelConfig
from megatron_longpo.models.attention.core import (
    ContextParallelAttention,
    CudnnContextParallelAttention,
    FA3ContextParallelAttention,
    FlashContextParallelAttention,
)
from megatron_longpo.runtime.capabilities import fa3_available, flash_attn_available, te_available, unavailable_reason

PROJECT_BACKENDS = {"sdpa": ContextParallelAttention, "flash": FlashContextParallelAttention,
                    "cudnn": CudnnContextParallelAttention, "fa3": FA3ContextParallelAttention}
# kernel -> (can it run here, the package it needs, how to get it)
_KERNEL_NEEDS = {
    "flash": (flash_attn_available, "flash_attn", "flash-attn >= 2.1 (pip install -e '.[flash]')"),
    "cudnn": (te_available, "transformer_engine", "Transformer Engine (pip install -e '.[gpu]' or an NGC container)"),
    "fa3": (fa3_available, "flash_attn_interface", "FlashAttention-3 (flash-attention/hopper, built from source)"),
}


def resolve_attention_backend(parallel: ParallelConfig, pair_layout: str, transformer_impl: str) -> str:
    """``te``, ``sdpa`` or ``flash`` for this run; raises naming the option when it cannot run.

    ``auto``: TE attention (its own CP, cp_comm_type) on CUDA with Transformer Engine and the
    ``two_sequences`` layout; the project attention with SDPA otherwise.
    ``transformer_impl`` is the resolved layer implementation (``local`` | ``transformer_engine``).
    """
    backend = parallel.attention_backend
    te_ok = transformer_impl == "transformer_engine" and te_available()
    if backend == "auto":
        return "te" if te_ok and pair_layout == "two_sequences" else "sdpa"
    if backend == "te":
        if pair_layout == "shared_prefix":
            raise ConfigError(
                "parallel.attention_backend=te cannot run data.pair_layout=shared_prefix (TE attention "
                "cannot express the branch mask); use parallel.attention_backend=auto, sdpa or flash"
            )
        if not te_ok:
            raise RuntimeError(
                "parallel.attention_backend=te needs Transformer Engine with CUDA and the TE layer spec "
                "(model.transformer_impl=auto or transformer_engine); use parallel.attention_backend=sdpa"
            )
        return "te"
    if backend in _KERNEL_NEEDS:
        runs, package, what = _KERNEL_NEEDS[backend]
        if not runs():
            # the import error is reported: a wrong binary must not look like "not installed"
            raise RuntimeError(
                f"parallel.attention_backend={backend} needs CUDA and {what}, but here: "
                f"{unavailable_reason(package)}; use parallel.attention_backend=sdpa (same math, torch kernels)"
            )
    if backend not in PROJECT_BACKENDS:
        raise ConfigError(f"parallel.attention_backend={backend!r} is not one of auto, te, {', '.join(PROJECT_BACKENDS)}")
    return backend


def core_attention_class(backend: str, kv_gather_chunks: int = 1) -> Optional[type]:
    """The core-attention class for a resolved backend (None: keep the layer spec's TE attention);
    ``kv_gather_chunks`` > 1 (parallel.cp_kv_gather_chunks) overlaps the K/V gather with attention."""
    if backend == "te":
        return None
    cls = PROJECT_BACKENDS[backend]
    if kv_gather_chunks == 1:
        return cls
    return type(f"{cls.__name__}KV{kv_gather_chunks}", (cls,), {"kv_gather_chunks": kv_gather_chunks})
