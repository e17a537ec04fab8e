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
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


def cuda_available() -> bool:
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Probe:
    """The outcome of importing one optional package: its version, or why it did not import."""

    ok: bool
    version: Optional[str] = None
    error: Optional[str] = None  # "ImportError: ..." (one line) when the import failed


def _probe(import_module: Callable[[], Any]) -> Probe:
    try:
        mod = import_module()
    except Exception as e:  # a wrong binary raises OSError / RuntimeError / ImportError alike
        return Probe(False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip())
    return Probe(True, version=str(getattr(mod, "__version__", "") or "") or None)


def _import_te() -> Any:
    import transformer_engine  # optional: transformer-engine is a GPU extra
    import transformer_engine.pytorch  # noqa: F401  # optional: transformer-engine is a GPU extra

    return transformer_engine


def _import_flash_attn() -> Any:
    import flash_attn  # optional: flash-attn is its own extra (flash)

    return flash_attn


def _import_fa3() -> Any:
    # FlashAttention-3 (Hopper) installs as flash_attn_interface (flash-attention/hopper)
    import flash_attn_interface  # optional: FA3 is built from source (docs/install.md)

    return flash_attn_interface


def _import_fused_wgrad() -> Any:
    import fused_weight_gradient_mlp_cuda  # optional: apex CUDA extension, built from source

    return fused_weight_gradient_mlp_cuda


_IMPORTERS: dict[str, Callable[[], Any]] = {
    "transformer_engine": _import_te,
    "flash_attn": _import_flash_attn,
    "flash_attn_interface": _import_fa3,
    "fused_weight_gradient_mlp_cuda": _import_fused_wgrad,
}


@functools.cache
def probe(package: str) -> Probe:
    """Import ``package`` (one of the optional GPU packages) once; keep its version or its error."""
    return _probe(_IMPORTERS[package])


def import_error(package: str) -> Optional[str]:
    """Why an installed-or-not optional package did not import (None when it imports): the text
    the error of an explicitly requested kernel carries, so a wrong binary is not silent."""
    return probe(package).error


def te_version() -> Optional[str]:
    """Transformer Engine's version string when it imports (gpu_rules.py judges it)."""
    return probe("transformer_engine").version


def _te_importable() -> bool:
    return probe("transformer_engine").ok


def _flash_attn_version() -> Optional[tuple[int, int]]:
    p = probe("flash_attn")
    if not p.ok or p.version is None:
        return None
    try:
        major, minor = (int(x) for x in p.version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def _fused_wgrad_importable() -> bool:
    return probe("fused_weight_gradient_mlp_cuda").ok


def te_available() -> bool:
    """True when Transformer Engine imports and CUDA is usable."""
    return cuda_available() and _te_importable()


def flash_attn_available() -> bool:
    """flash-attn >= 2.1 (bottom-right causal alignment) imports and CUDA is usable."""
    if not cuda_available():
        return False
    version = _flash_attn_version()
    return version is not None and version >= (2, 1)


def fa3_available() -> bool:
    """FlashAttention-3 (``flash_attn_interface``, Hopper) imports and CUDA is usable."""
    return cuda_available() and probe("flash_attn_interface").ok


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
    fa3: bool = False
    te_version: Optional[str] = None
    # package -> one-line import error, for the optional packages that did not import
    import_errors: tuple[tuple[str, str], ...] = ()

    @classmethod
    def detect(cls) -> "Capabilities":
        errors = tuple((name, err) for name in _IMPORTERS if (err := import_error(name)) is not None)
        return cls(cuda=cuda_available(), te=te_available(), flash_attn=flash_attn_available(),
                   grad_accum_fusion=grad_accum_fusion_available(), fa3=fa3_available(),
                   te_version=te_version(), import_errors=errors)


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


def unavailable_reason(package: str) -> str:
    """Why ``package`` cannot run here, for the error of an option that asked for it."""
    if not cuda_available():
        return "no CUDA device"
    err = import_error(package)
    return f"import {package} failed: {err}" if err else f"{package} imported but is too old"


def resolve_transformer_impl(requested: str, te: bool) -> str:
    """``model.transformer_impl`` (auto | local | transformer_engine) for a machine with/without TE."""
    if requested == "auto":
        return "transformer_engine" if te else "local"
    if requested == "transformer_engine" and not te:
        raise RuntimeError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not importable "
            f"with CUDA ({unavailable_reason('transformer_engine')}); install the 'gpu' extra or set "
            "model.transformer_impl=local"
        )
    return requested


def use_distributed_optimizer(requested: bool, cuda: bool) -> bool:
    """The distributed optimizer shards state over DP; Megatron supports it on CUDA only (on CPU
    the replicated optimizer runs instead: same math)."""
    return requested and cuda
