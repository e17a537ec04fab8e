"""Count host-device synchronisation points of a code path, on CPU or GPU.

On a GPU, reading a value back (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``)
or an op with a data-dependent output shape (``nonzero``, ``unique``, ``masked_select``) blocks
the host until the device has caught up, which stalls the kernel queue once per call. On a CPU
run nothing blocks, but the same calls are made, so :class:`SyncCounter` (a TorchFunctionMode)
counts them by name on any device.

Calls made inside the *host phase* functions listed in ``HOST_PHASE`` are not counted: they take
only host (CPU) tensors (``plan_rows`` refuses device tensors), so they cannot block a GPU.
Anything else that reads a tensor back is a sync on a GPU and is counted with its call site.
``.to(device)`` is not counted: on a CPU run its target is the CPU whether or not the GPU code
would copy back; the GPU check catches those (and blocking copies) with :func:`cuda_sync_warnings`.
:func:`cuda_sync_warnings` is the GPU-side check (PyTorch's own sync debug mode).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

SYNC_METHODS = {
    "item", "tolist", "cpu", "numpy", "nonzero", "argwhere", "unique", "unique_consecutive",
    "masked_select", "__int__", "__float__", "__bool__", "__index__",
}
# Functions whose whole body is host work on CPU tensors (module name, function name).
HOST_PHASE = {
    ("megatron_longpo.loss.logprobs", "plan_rows"),
    ("megatron_longpo.training.step", "validate_batch"),
    ("megatron_longpo.training.step", "global_token_normalizer"),
    ("megatron_longpo.data.batch", "for_cp_rank"),  # host ids, branch layout decoded on the CPU
    ("megatron_longpo.models.attention.core", "row_layouts"),  # branch layout is a CPU tensor
}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter() as c: ...`` then ``c.count`` and ``c.sites`` (Counter of call sites)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter = Counter()

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name in SYNC_METHODS:
            site = self._site()
            if site is not None:
                self.sites[f"{name} at {site}"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _site() -> str | None:
        """The innermost non-torch caller, or None when inside a host-phase function."""
        f = sys._getframe(2)
        site = None
        while f is not None:
            mod = f.f_globals.get("__name__", "")
            if (mod, f.f_code.co_name) in HOST_PHASE:
                return None
            if site is None and not mod.startswith(("torch", "megatron_longpo.testing.syncs")):
                site = f"{mod}:{f.f_code.co_name}:{f.f_lineno}"
            f = f.f_back
        return site or "<unknown>"


@contextlib.contextmanager
def cuda_sync_warnings() -> Iterator[Counter]:
    """On CUDA: count PyTorch's "called a synchronizing CUDA operation" warnings by call site."""
    prev = torch.cuda.get_sync_debug_mode()
    sites: Counter = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(prev)
            for w in caught:
                if "synchroniz" in str(w.message):
                    sites[f"{w.filename}:{w.lineno}"] += 1
