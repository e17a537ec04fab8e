"""GPU test helpers: how many GPUs are visible, process counts sized to them, skip markers."""

from __future__ import annotations

import pytest
import torch


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_nproc(want: int = 2) -> int:
    """Processes per node for a GPU test: at most ``want``, never more than the visible GPUs."""
    return max(1, min(want, visible_gpus()))


def needs_gpus(n: int):
    return pytest.mark.skipif(visible_gpus() < n, reason=f"needs {n} visible GPUs, have {visible_gpus()}")
