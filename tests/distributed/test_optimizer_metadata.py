"""The optimizer checkpoint format is chosen explicitly, recorded and checked.

The plain optimizer (CPU) saves its state per parameter (training/optimizer_state.py, recorded
as 'per_parameter'); the distributed optimizer uses Megatron's own format, 'dp_reshardable'
(without metadata Megatron-Core falls back to the deprecated 'fully_sharded_model_space'). The
distributed optimizer does not run on CPU, so Megatron's format is exercised here with the plain
optimizer, which ignores the metadata: these tests check what the project controls: the format
recorded in longpo_meta.json, the metadata passed at save and at load, that checkpoints in
Megatron's format (older plain-optimizer ones) still load, and the refusal of a type this code
cannot load (the distributed optimizer itself runs in tests/gpu and the GPU check's checkpoint
section).
"""

import json

import pytest
import torch

from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, random_tokens, tiny_model_config

pytestmark = pytest.mark.distributed


def _spy(opt, calls):
    inner = opt.sharded_state_dict

    def spy(model_sd, is_loading=False, **kw):
        calls.append((is_loading, kw.get("metadata")))
        return inner(model_sd, is_loading, **kw)

    opt.sharded_state_dict = spy


def _build():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_longpo.config import OptimConfig
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.training.optimizer import build_optimizer

    mcfg = tiny_model_config("llama")
    g = init_model_parallel(parallel_config(tp=1))
    set_seed(0)
    model = build_model(mcfg, parallel_config(tp=1))
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False), module=model)
    opt, sched = build_optimizer([ddp], OptimConfig(lr=1e-3), mcfg, 4)
    tokens = random_tokens(1, 16, mcfg.vocab_size, 1)  # one step, so the optimizer has state to save
    ddp(tokens, torch.arange(16).unsqueeze(0), None, labels=tokens.roll(-1, 1)).mean().backward()
    finalize_model_grads([ddp])
    opt.step()
    return mcfg, g, model, opt, sched


def _save_and_load(run_dir, meta_edit, megatron_format=True):
    from megatron_longpo.checkpoint import CheckpointError
    from megatron_longpo.training import checkpointing
    from megatron_longpo.training.checkpointing import TrainState, load_checkpoint, save_training_checkpoint

    mcfg, g, model, opt, sched = _build()
    calls: list = []
    _spy(opt, calls)
    chosen = checkpointing.optimizer_sharding_of
    if megatron_format:  # as the distributed optimizer (and this project before 'per_parameter') saves
        checkpointing.optimizer_sharding_of = lambda o: checkpointing.OPTIMIZER_SHARDING
    try:
        final = save_training_checkpoint(run_dir, TrainState(1, 2), model, opt, sched, {}, g, model_cfg=mcfg)
    finally:
        checkpointing.optimizer_sharding_of = chosen
    meta_path = final / "longpo_meta.json"
    meta = json.loads(meta_path.read_text())
    recorded = meta["train_state"].get("optimizer_sharding")
    if meta_edit is not None:
        meta_edit(meta["train_state"])
        meta_path.write_text(json.dumps(meta))
    try:
        load_checkpoint(run_dir, model, opt, sched, g, mcfg, verify="none")
        error = None
    except CheckpointError as e:
        error = str(e)
    return recorded, calls, error


def _drop(ts):
    del ts["optimizer_sharding"]


def _unknown(ts):
    ts["optimizer_sharding"] = "fsdp_dtensor"


def test_metadata_passed_recorded_and_checked(tmp_path):
    # The plain optimizer's own format: Megatron's sharded_state_dict is not used.
    recorded, calls, error = run_distributed(_save_and_load, 1, args=(str(tmp_path / "p"), None, False))[0]
    assert recorded == "per_parameter" and calls == [] and error is None
    recorded, calls, error = run_distributed(_save_and_load, 1, args=(str(tmp_path / "a"), None))[0]
    assert recorded == "dp_reshardable" and error is None
    assert calls == [(False, {"distrib_optim_sharding_type": "dp_reshardable"}),
                     (True, {"distrib_optim_sharding_type": "dp_reshardable"})]
    # A checkpoint from before the metadata was passed loads in the format it was written in.
    _, calls, error = run_distributed(_save_and_load, 1, args=(str(tmp_path / "b"), _drop))[0]
    assert error is None and calls[1] == (True, {"distrib_optim_sharding_type": "fully_sharded_model_space"})
    # A type this code cannot load is refused before any tensor is read, naming the field and the fix.
    _, calls, error = run_distributed(_save_and_load, 1, args=(str(tmp_path / "c"), _unknown))[0]
    assert len(calls) == 1 and "optimizer_sharding='fsdp_dtensor'" in error and "finetune=true" in error
    assert "\n" not in error
