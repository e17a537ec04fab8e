"""The Megatron side of conversion: a single-process TP=1 runtime and weight-less models.

Conversion never runs the Megatron model, it only needs its parameters as containers and its
``sharded_state_dict()`` (the dist-checkpoint keys, stacked-layer offsets and the fc1 gate/up
factory). The model is built without random init (``perform_initialization=False``), so its
parameters are untouched allocations that use no physical memory until data is copied in.
Import saves through :class:`StreamingSaveStrategy`, which fills each tensor as it is written.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (  # the steps of megatron's torch_dist save
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

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


_M_MMAP_THRESHOLD = -3  # <malloc.h>
_MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory() -> None:
    """Make glibc give freed tensors of 1 MiB and more back to the system at once.

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so later
    tensors of that size come from the heap and stay resident after ``del``: loading a checkpoint
    (one temporary per tensor) or splitting fc1 halves left ~0.1 of the model bytes as freed but
    resident heap. A fixed threshold keeps peak memory at what is really alive. No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    # The symbols already loaded (no ctypes.util.find_library: it starts a subprocess).
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def empty_model(model_cfg: ModelConfig) -> torch.nn.Module:
    """TP=1 GPTModel on CPU in ``model_cfg.params_dtype`` with uninitialised parameters.

    The local spec's sharded-state-dict keys equal the TE spec's, so the checkpoint loads into
    either.
    """
    return build_model(dataclasses.replace(model_cfg, transformer_impl="local"), ParallelConfig(), initialize=False)


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """A tensor of a save request: rows [start, stop) of Megatron parameter ``param``, not yet filled."""

    param: str
    start: int
    stop: int
    tensor: torch.Tensor


def save_request(model: torch.nn.Module) -> tuple[dict, list[SavedTensor]]:
    """``model.sharded_state_dict()`` on new untouched tensors, and what each of them holds.

    Each fc1 factory is split into its gate / up halves here, each half a tensor of its own, so
    that every saved tensor owns its storage: :class:`StreamingSaveStrategy` fills it right
    before it is written and frees it right after. Consumes ``model`` (its parameters are
    released; they were never touched).
    """
    sd = model.sharded_state_dict()
    params = dict(model.named_parameters())
    saved: list[SavedTensor] = []
    for key, item in list(sd.items()):
        if isinstance(item, ShardedObject):
            continue  # _extra_state: saved as is
        if key not in params:
            raise TypeError(f"{key}: sharded entry {type(item).__name__} is not a parameter")
        built = item.build() if isinstance(item, ShardedTensorFactory) else item
        shards = built if isinstance(built, list) else [built]
        param = params[key]
        row = math.prod(param.shape[1:])
        for sh in shards:
            if not isinstance(sh, ShardedTensor):
                raise TypeError(f"{key}: factory built {type(sh).__name__}, expected ShardedTensor")
            if sh.data.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
                raise TypeError(f"{key}: a sharded tensor that is not a view of the parameter")
            start = sh.data.storage_offset() // row
            sh.data = torch.empty_like(sh.data, memory_format=torch.contiguous_format)
            saved.append(SavedTensor(key, start, start + sh.data.shape[0], sh.data))
        sd[key] = built
        param.data = torch.empty(0, dtype=param.dtype)
    return sd, saved


class _FillOnWritePlanner(MCoreSavePlanner):
    """Hands the writer each tensor right after ``fill`` wrote its data, and frees the tensor
    written before (the writer asks for the next item only once the previous one is written)."""

    def __init__(self, saved: list[SavedTensor], fill: Callable[[SavedTensor], None]) -> None:
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._by_storage = {st.tensor.untyped_storage().data_ptr(): st for st in saved}
        self._fill = fill
        self._written: Optional[SavedTensor] = None

    def resolve_data(self, write_item: WriteItem) -> Any:
        data = super().resolve_data(write_item)
        if write_item.type != WriteItemType.BYTE_IO:
            self.release()
            st = self._by_storage.pop(data.untyped_storage().data_ptr(), None)
            if st is None:
                raise RuntimeError(f"{write_item.index.fqn}: no source for this tensor (or asked for twice)")
            self._fill(st)
            self._written = st
        return data

    def release(self) -> None:
        if self._written is not None:
            self._written.tensor.untyped_storage().resize_(0)
            self._written = None

    def unwritten(self) -> list[str]:
        return sorted({st.param for st in self._by_storage.values()})


class StreamingSaveStrategy(SaveShardedStrategy):
    """torch_dist save (the format of megatron's default strategy) that reads each tensor only
    when it is written, so a conversion holds one tensor instead of the model.

    Single process, synchronous: torch DCP's own file writer with one thread writes the items
    one after the other (megatron's writer would need every tensor in memory before it forks
    its writer processes). The planner is megatron's, so keys, chunks and metadata are those of
    megatron's save (less the plan cache its writer keeps for repeated saves).
    """

    def __init__(self, saved: list[SavedTensor], fill: Callable[[SavedTensor], None]) -> None:
        super().__init__("torch_dist", 1)
        self.saved, self.fill = saved, fill

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        planner = _FillOnWritePlanner(self.saved, self.fill)
        # One thread and no copy-ahead: the writer then resolves an item only after writing the
        # one before (with CUDA present, copy-ahead would resolve items early and the planner
        # would free a tensor that is not written yet).
        writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, per_thread_copy_ahead=0)
        try:
            dcp.save(mcore_to_pyt_state_dict(by_key, False), storage_writer=writer, planner=planner)
        finally:
            planner.release()
        if planner.unwritten():
            raise RuntimeError(f"the save wrote no data for {planner.unwritten()[:4]}")


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
