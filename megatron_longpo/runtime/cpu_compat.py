"""Run megatron-core 0.16.1 on CPU (gloo) for tests and the CPU demo.

megatron-core assumes CUDA in a handful of places. This module is the ONE place where the project
patches around that. :func:`enable` is a no-op when CUDA is available, so none of these patches is
ever active on a GPU run. Each patch, and why it is needed:

1. ``torch.cuda.current_device`` -> ``"cpu"``. Called at forward time by rotary embeddings,
   tensor-parallel all-gather buffers (``tensor_parallel.mappings``), layer buffers, the DDP grad
   buffer and the optimizer. Returning the string ``"cpu"`` makes ``device=...`` and ``.to(...)``
   land on CPU without touching the calling code.
2. CUDA RNG state -> CPU RNG state. ``tensor_parallel.random`` (the model-parallel RNG tracker
   used for init and dropout) reads/writes ``torch.cuda`` generator states; on CPU those map onto
   the default CPU generator, which gives the same fork/restore semantics.
3. Hard-coded ``device="cuda"`` / ``torch.cuda.FloatTensor`` in factory calls (optimizer scale and
   found-inf tensors, grad clipping, grad-buffer warm-up): a global ``TorchFunctionMode`` rewrites a
   CUDA device argument of tensor factory calls to CPU.
4. ``torch.cuda.synchronize`` / ``Stream`` / ``Event`` / ``empty_cache`` / memory statistics:
   harmless no-ops or dummies on CPU (the MoE alltoall dispatcher records an event on its
   device-to-host stream: ``Stream.record_event`` returns a dummy event).
5. ``optimizer.clip_grads.clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor``
   gradients: replaced (in ``clip_grads`` and ``optimizer``, which imported it) by the same
   in-place scaling without the device assertion.
6. ``rope_utils.get_pos_emb_on_this_cp_rank`` allocates its index with ``pin_memory=True``, which
   needs a CUDA runtime: the mode drops ``pin_memory`` on factory calls.
   (megatron's own pure-PyTorch ``local_multi_tensor_*`` fallbacks, used for grad-norm and
   clipping when neither apex nor TE is installed, allocate on ``"cuda"`` too.)
7. ``transformer.moe.moe_utils`` names ``te_general_gemm`` only when Transformer Engine imports,
   but the MoE router's gating (``RouterGatingLinearFunction``) tests it unconditionally: a
   NameError on every MoE forward without TE. It is defined as ``None`` (the router then uses
   ``torch.matmul``, the same math). Applied only where TE is absent.
8. The MoE alltoall token dispatcher turns its split sizes into numpy arrays with
   ``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)``, which converts only CUDA tensors;
   on CPU the splits stay tensors and gloo's ``all_to_all_single`` rejects them. The replacement
   also converts CPU tensors when ``as_numpy`` is asked (patched where the dispatcher imported it).

The normalisation layers of the local spec are the project's own RMSNorm
(:mod:`megatron_longpo.models.norm`), which tolerates sequence parallelism, so no patch is needed
for that.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: TorchFunctionMode | None = None

_FACTORIES = {
    torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand,
    torch.randn, torch.randint, torch.linspace, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.full_like, torch.as_tensor, torch.eye, torch.empty_strided,
}


def _is_cuda_device(d: Any) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, int) and not isinstance(d, bool):
        return True  # a bare int device means cuda:<int>
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device arguments of factory / ``.to`` / ``.cuda`` calls to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES:
            if _is_cuda_device(kwargs.get("device")):
                kwargs = dict(kwargs, device="cpu")
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)
        elif func is torch.Tensor.to:
            if args[1:] and _is_cuda_device(args[1]):
                args = (args[0], "cpu") + tuple(args[2:])
            if _is_cuda_device(kwargs.get("device")):
                kwargs = dict(kwargs, device="cpu")
        elif func is torch.Tensor.cuda:
            return args[0]
        elif func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """Megatron's clip_grad_by_total_norm_fp32 without its CUDA-tensor assertion (same math)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


def is_enabled() -> bool:
    return _ENABLED


def enable() -> bool:
    """Activate the CPU patches if CUDA is absent. Idempotent. Returns whether they are active."""
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True

    # Megatron's TP layers advise CUDA_DEVICE_MAX_CONNECTIONS=1 on every forward; a CUDA stream
    # setting means nothing on CPU.
    warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.set_device = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.max_memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.Stream = _DummyStream  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _DummyStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.Event = _DummyEvent  # type: ignore[assignment]

    # deferred: harness workers enable these patches before megatron-core loads
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )

    # deferred: harness workers enable these patches before megatron-core loads
    from megatron.core.optimizer import clip_grads, optimizer as moptimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    # deferred: harness workers enable these patches before megatron-core loads
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # deferred: harness workers enable these patches before megatron-core loads
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _move_tensor_to_cpu

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    return True


def _move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """megatron's ``maybe_move_tensor_to_cpu`` for CPU tensors: numpy when asked (patch 8)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


class _DummyStream:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def wait_stream(self, *a: Any, **k: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *a: Any, **k: Any) -> "_DummyEvent":  # MoE alltoall dispatcher's D2H stream
        return _DummyEvent()

    def __enter__(self) -> "_DummyStream":
        return self

    def __exit__(self, *a: Any) -> None:
        pass


class _DummyEvent:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def record(self, *a: Any, **k: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, *a: Any, **k: Any) -> None:
        pass

    def elapsed_time(self, other: Any) -> float:
        return 0.0
