"""Process-level GPU checks every entry point runs before the process group exists.

- local world size vs visible GPUs: ``torchrun --nproc-per-node 2`` on a 1-GPU machine otherwise
  dies in ``torch.cuda.set_device(1)`` with "invalid device ordinal" on rank 1 only, and rank 0
  hangs in the rendezvous until the timeout;
- ``NVTE_*_ATTN`` values Megatron-Core asserts on (gpu_rules.nvte_env_errors);
- ``CUDA_DEVICE_MAX_CONNECTIONS=1``: Megatron's TP/SP and CP communication overlap relies on the
  GPU running kernels in launch order, which this setting forces. CUDA reads it when the context
  is created, so the trainer sets it before any CUDA call (Megatron-LM asserts the same rule for
  tp > 1 or cp > 1 on pre-Blackwell GPUs).
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

import torch

from megatron_longpo.config import ConfigError, ParallelConfig
from megatron_longpo.gpu_rules import nvte_env_errors

MAX_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def visible_gpu_count() -> int:
    """GPUs this process can use (0 without CUDA). Does not create a CUDA context."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_world_size_errors(environ: MutableMapping[str, str], visible_gpus: int, backend: str) -> list[str]:
    """torchrun's LOCAL_WORLD_SIZE / LOCAL_RANK must fit the visible GPUs of a CUDA run."""
    if backend == "gloo" or visible_gpus == 0:
        return []
    local_world = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    if local_world > visible_gpus or local_rank >= visible_gpus:
        return [
            f"this node runs {local_world} processes per node (LOCAL_WORLD_SIZE; this is LOCAL_RANK "
            f"{local_rank}) but only {visible_gpus} GPU(s) are visible (CUDA_VISIBLE_DEVICES="
            f"{environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); launch with torchrun --nproc-per-node "
            f"{visible_gpus} (or fewer), or make more GPUs visible"
        ]
    return []


def needs_single_connection(parallel: ParallelConfig) -> bool:
    """TP / CP communication overlap needs in-order kernel launch (CUDA_DEVICE_MAX_CONNECTIONS=1)."""
    return parallel.tensor_model_parallel_size > 1 or parallel.context_parallel_size > 1


def set_max_connections(parallel: ParallelConfig, environ: MutableMapping[str, str],
                        cuda_initialized: bool) -> Optional[str]:
    """Set CUDA_DEVICE_MAX_CONNECTIONS=1 when needed; returns the value set (None when untouched)."""
    if not needs_single_connection(parallel):
        return None
    current = environ.get(MAX_CONNECTIONS)
    if current == "1":
        return None
    if current is not None:
        raise ConfigError(
            f"{MAX_CONNECTIONS}={current} but tensor/context parallelism (tp={parallel.tensor_model_parallel_size}, "
            f"cp={parallel.context_parallel_size}) needs {MAX_CONNECTIONS}=1 for its communication overlap; "
            f"unset it or export {MAX_CONNECTIONS}=1"
        )
    if cuda_initialized:
        raise ConfigError(
            f"tensor/context parallelism needs {MAX_CONNECTIONS}=1, which CUDA reads when it starts, but CUDA "
            f"was initialised before the trainer could set it; export {MAX_CONNECTIONS}=1 in the launch script"
        )
    environ[MAX_CONNECTIONS] = "1"
    return "1"


def check_process_environment(parallel: ParallelConfig, environ: Optional[MutableMapping[str, str]] = None,
                              visible_gpus: Optional[int] = None, backend: str = "auto") -> None:
    """Every process-level start-up rule; raises ConfigError naming each violation and its fix."""
    env = os.environ if environ is None else environ
    gpus = visible_gpu_count() if visible_gpus is None else visible_gpus
    errs = local_world_size_errors(env, gpus, backend) + nvte_env_errors(env)
    if errs:
        raise ConfigError("; ".join(errs))
    if gpus > 0 and backend != "gloo":
        set_max_connections(parallel, env, torch.cuda.is_initialized())
