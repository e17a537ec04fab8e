"""What this machine can run: the ONE place that decides device capabilities.

Every "is Transformer Engine here", "which transformer implementation", "can flash-attn run",
"which device", "which device does a collective on this group use" and "is the distributed
optimizer on" question is answered here; callers never probe ``torch.cuda`` or try optional
imports themselves. Probes of optional packages are cached (an import attempt is not free and its
answer cannot change within a process); CUDA availability is read live (cheap, and tests simulate
a GPU machine by patching ``torch.cuda.is_available``). Policy decisions take their inputs
explicitly (:func:`resolve_transformer_impl`, :func:`use_distributed_optimizer`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.cache
def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401  # optional: transformer-engine is a GPU extra
    except Exception:
        return False
    return True


@functools.cache
def _flash_attn_version() -> Optional[tuple[int, int]]:
    try:
        import flash_attn  # optional: flash-attn is a GPU extra
    except Exception:
        return None
    try:
        major, minor = (int(x) for x in flash_attn.__version__.split(".")[:2])
    except ValueError:
        return None
    return major, minor


@functools.cache
def _fused_wgrad_importable() -> bool:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401  # optional: apex CUDA extension, built from source
    except ImportError:
        return False
    return True


def te_available() -> bool:
    """True when Transformer Engine imports and CUDA is usable."""
    return cuda_available() and _te_importable()


def flash_attn_available() -> bool:
    """flash-attn >= 2.1 (bottom-right causal alignment) imports and CUDA is usable."""
    if not cuda_available():
        return False
    version = _flash_attn_version()
    return version is not None and version >= (2, 1)


def grad_accum_fusion_available() -> bool:
    """Megatron's local output layer needs apex's fused_weight_gradient_mlp_cuda for this fusion."""
    return cuda_available() and _fused_wgrad_importable()


@dataclass(frozen=True)
class Capabilities:
    """A snapshot of what this process can run (reports, the GPU check)."""

    cuda: bool
    te: bool
    flash_attn: bool
    grad_accum_fusion: bool

    @classmethod
    def detect(cls) -> "Capabilities":
        return cls(cuda=cuda_available(), te=te_available(), flash_attn=flash_attn_available(),
                   grad_accum_fusion=grad_accum_fusion_available())


def device() -> torch.device:
    """The device this process computes on: its CUDA device, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def default_backend() -> str:
    """``parallel.distributed_backend=auto``: nccl with CUDA, gloo otherwise."""
    return "nccl" if cuda_available() else "gloo"


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where a tensor must live for a collective on ``group`` (the default group if None):
    nccl reduces CUDA tensors, gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def resolve_transformer_impl(requested: str, te: bool) -> str:
    """``model.transformer_impl`` (auto | local | transformer_engine) for a machine with/without TE."""
    if requested == "auto":
        return "transformer_engine" if te else "local"
    if requested == "transformer_engine" and not te:
        raise RuntimeError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not importable "
            "with CUDA; install the 'gpu' extra or set model.transformer_impl=local"
        )
    return requested


def use_distributed_optimizer(requested: bool, cuda: bool) -> bool:
    """The distributed optimizer shards state over DP; Megatron supports it on CUDA only (on CPU
    the replicated optimizer runs instead: same math)."""
    return requested and cuda
