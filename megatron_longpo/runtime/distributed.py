"""torch.distributed + Megatron parallel_state initialisation and seeding."""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import rerun_state_machine as rsm
from megatron.core import tensor_parallel

from megatron_longpo.config import ParallelConfig
from megatron_longpo.runtime import capabilities, cpu_compat
from megatron_longpo.runtime.gpu_env import check_process_environment
from megatron_longpo.runtime.signals import die_with_launcher


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups and ranks of this process, passed explicitly to math that needs them."""

    tp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup  # data parallel WITHOUT context parallel
    dp_cp_group: dist.ProcessGroup  # data parallel x context parallel (DDP grad reduction)
    tp_rank: int
    tp_size: int
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    # Mixture-of-experts layout: experts split over ep ranks, each expert's weights over etp ranks.
    ep_group: Optional[dist.ProcessGroup] = None
    ep_rank: int = 0
    ep_size: int = 1
    etp_group: Optional[dist.ProcessGroup] = None
    etp_rank: int = 0
    etp_size: int = 1
    pp_group: Optional[dist.ProcessGroup] = None  # pipeline stages of this model replica
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def is_last_stage(self) -> bool:
        """This rank holds the last pipeline stage (output layer, log-probs, loss, metrics)."""
        return self.pp_rank == self.pp_size - 1


def dp_share(num: int, groups: ParallelGroups) -> list[Optional[int]]:
    """This data-parallel rank's share of ``num`` independent forwards (batches 0..num-1 dealt
    round-robin: dp_rank, dp_rank + dp, ...).

    Under expert parallelism the DP ranks of an expert group meet in every MoE layer (the token
    exchange), so each must run as many forwards as the others: the share is padded with None up
    to ceil(num / dp), where the caller runs a small filler forward and discards its result.
    """
    mine: list[Optional[int]] = list(range(groups.dp_rank, num, groups.dp_size))
    if groups.ep_size > 1:
        mine += [None] * (-(-num // groups.dp_size) - len(mine))
    return mine


def group_max(value: int, group: Optional[dist.ProcessGroup]) -> int:
    """The largest ``value`` over ``group`` (collective)."""
    t = torch.tensor([value], dtype=torch.int64, device=capabilities.collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def rank() -> int:
    """This process's rank in the default group (0 before / without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default group (1 before / without torch.distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def init_distributed(parallel: ParallelConfig) -> None:
    """Initialise the default process group from torchrun env vars (or a single process).

    Refuses (ConfigError) before any collective a local world size larger than the visible GPUs
    and bad NVTE_* values, and sets CUDA_DEVICE_MAX_CONNECTIONS=1 for TP/CP (runtime/gpu_env.py).
    """
    cpu_compat.enable()
    if dist.is_initialized():
        return
    die_with_launcher()  # a torchrun worker never outlives its launcher (kill -9 of torchrun)
    backend = parallel.distributed_backend
    if backend == "auto":
        backend = capabilities.default_backend()
    check_process_environment(parallel, backend=backend)
    if backend == "nccl" and not capabilities.cuda_available():
        raise RuntimeError("parallel.distributed_backend=nccl needs CUDA; use gloo (or auto) on CPU")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_device = None
    if capabilities.cuda_available():
        local_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(local_device)
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(**process_group_kwargs(backend, rank, world, parallel.distributed_timeout_minutes,
                                                   local_device))


def process_group_kwargs(backend: str, rank: int, world: int, timeout_minutes: int,
                         device: Optional[torch.device]) -> dict:
    """Arguments of ``init_process_group``. With NCCL the device is bound up front (``device_id``):
    the communicator is created eagerly on this rank's GPU instead of lazily at the first
    collective, where a barrier would have to guess the device."""
    kw = dict(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_minutes))
    if backend == "nccl" and device is not None:
        kw["device_id"] = device
    return kw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(parallel: ParallelConfig) -> ParallelGroups:
    """Create Megatron's TP/CP/DP(/PP) and expert (EP/ETP) groups and return the ones the project uses."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    _init_rerun_state_machine()
    return current_groups()


def _init_rerun_state_machine() -> None:
    """Initialise Megatron's rerun state machine (disabled: we do not re-run steps) explicitly.

    Left implicit, the first schedule call logs "Implicit initialization of Rerun State Machine!"
    and the mode as WARNINGs on every run; neither is something a user can act on.
    """
    if rsm._GLOBAL_RERUN_STATE_MACHINE is not None:  # process-wide singleton: once per process
        return
    log = logging.getLogger(rsm.__name__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        rsm.initialize_rerun_state_machine(mode=rsm.RerunMode.DISABLED)
    finally:
        log.setLevel(level)


def current_groups() -> ParallelGroups:
    return ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        ep_group=ps.get_expert_model_parallel_group(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
    )


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker.

    Megatron's tracker gives each TP rank its own stream for TP-sharded init / dropout
    (seed + 2718 + tp_rank) while data-parallel replicas share the default stream, as in
    Megatron-LM's ``_set_random_seed``.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if ps.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
