"""The Megatron side of conversion: a single-process TP=1 runtime and weight-less models.

Conversion never runs the Megatron model, it only needs its parameters as containers and its
``sharded_state_dict()`` (the dist-checkpoint keys, stacked-layer offsets and the fc1 gate/up
factory). The model is built without random init (``perform_initialization=False``), so its
parameters are untouched allocations that use no physical memory until data is copied in.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from megatron_longpo.config import ModelConfig, ParallelConfig
from megatron_longpo.convert.hf_config import ConversionError
from megatron_longpo.models.provider import build_model
from megatron_longpo.runtime.distributed import init_distributed, init_model_parallel


def single_process_runtime() -> None:
    """torch.distributed (gloo, world size 1) + Megatron TP=1 state, reusing an existing group."""
    parallel = ParallelConfig(distributed_backend="gloo")
    if not dist.is_initialized():
        init_distributed(parallel)
    if dist.get_world_size() != 1:
        raise ConversionError(
            f"conversion runs as a single process but world size is {dist.get_world_size()}; "
            "run the tool with plain python, not torchrun (the checkpoint loads at any TP later)"
        )
    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() != 1:
        init_model_parallel(parallel)


def empty_model(model_cfg: ModelConfig) -> torch.nn.Module:
    """TP=1 GPTModel on CPU in ``model_cfg.params_dtype`` with uninitialised parameters.

    The local spec's sharded-state-dict keys equal the TE spec's, so the checkpoint loads into
    either.
    """
    return build_model(dataclasses.replace(model_cfg, transformer_impl="local"), ParallelConfig(), initialize=False)


def sharded_state_dict_for_save(model: torch.nn.Module) -> dict:
    """``model.sharded_state_dict()`` whose tensors own their storage; consumes ``model``.

    The fc1 factory splits each [gate; up] parameter into two views, and megatron's CPU writer
    clones every view-backed tensor before writing anything: one extra copy of all fc1 weights
    (about half of a Llama model). Cloning here one parameter at a time and releasing the fused
    parameter right after keeps the peak at one model copy plus one fc1. ``model`` is unusable
    afterwards.
    """
    sd = model.sharded_state_dict()
    params = dict(model.named_parameters())
    for key, item in list(sd.items()):
        if not isinstance(item, ShardedTensorFactory):
            continue
        built = item.build()
        shards = built if isinstance(built, list) else [built]
        for sh in shards:
            if not isinstance(sh, ShardedTensor):
                raise TypeError(f"{key}: factory built {type(sh).__name__}, expected ShardedTensor")
            sh.data = sh.data.clone()
        sd[key] = built
        if key in params:
            params[key].data = torch.empty(0, dtype=params[key].dtype)
    return sd


def fresh_load_request(model: torch.nn.Module) -> dict:
    """``model.sharded_state_dict()`` rebuilt on new empty tensors, fc1 factories pre-split.

    Loading this fills new tensors (the model's parameters stay untouched) and returns each fc1
    as its [gate, up] halves instead of megatron's merged copy, so loading costs one model copy.
    (Loading a subset such as one layer is not possible: the stacked-layer tensors of the
    torch_dist format must be requested whole.)
    """
    out: dict = {}
    for key, item in model.sharded_state_dict().items():
        if isinstance(item, ShardedObject):
            continue  # _extra_state: nothing conversion needs
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            raise TypeError(f"{key}: unexpected sharded entry {type(item).__name__}")
        item = dataclasses.replace(item, data=torch.empty_like(item.data))
        out[key] = item.build() if isinstance(item, ShardedTensorFactory) else item
    return out


def row_slice(value: torch.Tensor | list, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a loaded tensor or of a list of row blocks (a split fc1)."""
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    offset = 0
    for block in value:
        n = block.shape[0]
        if offset <= start and stop <= offset + n:
            return block[start - offset : stop - offset]
        offset += n
    raise ValueError(f"rows {start}:{stop} span several blocks of sizes {[b.shape[0] for b in value]}")
