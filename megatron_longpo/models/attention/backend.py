"""Which core attention a run uses (parallel.attention_backend x data.pair_layout x hardware)."""

from __future__ import annotations

from typing import Optional

from megatron_longpo.config import ConfigError, ParallelConfig
from megatron_longpo.models.attention.core import ContextParallelAttention, FlashContextParallelAttention
from megatron_longpo.runtime.capabilities import flash_attn_available, te_available

PROJECT_BACKENDS = {"sdpa": ContextParallelAttention, "flash": FlashContextParallelAttention}


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
    if backend == "flash" and not flash_attn_available():
        raise RuntimeError(
            "parallel.attention_backend=flash needs CUDA and flash-attn >= 2.1 (pip install flash-attn); "
            "use parallel.attention_backend=sdpa (same math, torch kernels)"
        )
    if backend not in PROJECT_BACKENDS:
        raise ConfigError(f"parallel.attention_backend={backend!r} is not one of auto, te, sdpa, flash")
    return backend


def core_attention_class(backend: str) -> Optional[type]:
    """The core-attention class for a resolved backend (None: keep the layer spec's TE attention)."""
    return None if backend == "te" else PROJECT_BACKENDS[backend]
