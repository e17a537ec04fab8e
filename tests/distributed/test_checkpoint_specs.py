"""Checkpoints load across layer specs: module ``_extra_state`` absent or unexpected either way.

A converted checkpoint is written with the local spec (no TE ``_extra_state``); a TE run's has
them. The stand-in :class:`ExtraStateRMSNorm` carries extra state the way TE modules do
(``get_extra_state`` returns a tensor, ``set_extra_state`` takes it back), so both directions run
on CPU through the real dist_checkpointing code. Reference: the saving model's own weights.
"""

import io
import pickle
from pathlib import Path

import pytest
import torch

from megatron_longpo.models.norm import RMSNorm
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, tiny_model_config

pytestmark = pytest.mark.distributed


class ExtraStateRMSNorm(RMSNorm):
    """RMSNorm with TE-style extra state (a pickled dict in a uint8 tensor, as TE 2.x saves)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.meta = {"amax_history": [1.0, 2.0]}
        self.received = []

    def get_extra_state(self):
        return torch.frombuffer(bytearray(pickle.dumps(self.meta)), dtype=torch.uint8)

    def set_extra_state(self, state):
        self.received.append(state)
        if isinstance(state, torch.Tensor) and state.numel():
            self.meta = pickle.loads(state.numpy().tobytes())
        elif isinstance(state, io.BytesIO):
            self.meta = pickle.loads(state.getvalue())


def _build(extra: bool, seed: int):
    from megatron_longpo.config import OptimConfig
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.training.optimizer import build_optimizer

    mcfg = tiny_model_config("llama")
    g = init_model_parallel(parallel_config())
    set_seed(seed)
    model = build_model(mcfg, parallel_config())
    if extra:  # swap the final norm for the TE-like one (same weight)
        norm = ExtraStateRMSNorm(model.config, mcfg.hidden_size, eps=mcfg.norm_epsilon)
        norm.meta = {"amax_history": [float(seed), 3.0]}
        with torch.no_grad():
            norm.weight.copy_(model.decoder.final_layernorm.weight)
        model.decoder.final_layernorm = norm
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False), module=model)
    opt, sched = build_optimizer([ddp], OptimConfig(lr=1e-3), mcfg, 4)
    return mcfg, g, model, ddp, opt, sched


def _step(mcfg, ddp, opt):
    """One optimizer step so the checkpoint holds real optimizer state."""
    from megatron.core.distributed import finalize_model_grads

    tokens = torch.randint(0, mcfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ddp(tokens, pos, None, labels=tokens.roll(-1, 1)).mean().backward()
    finalize_model_grads([ddp])
    opt.step()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _save(run_dir, extra):
    from megatron_longpo.training.checkpointing import TrainState, save_training_checkpoint

    mcfg, g, model, ddp, opt, sched = _build(extra, seed=1)
    _step(mcfg, ddp, opt)
    assert any(k.endswith("final_layernorm._extra_state") for k in model.state_dict()) == extra
    save_training_checkpoint(run_dir, TrainState(3, 6), model, opt, sched, {}, g, model_cfg=mcfg)
    return _weights(model)


def _load(run_dir, extra, how):
    from megatron_longpo.checkpoint import load_model_checkpoint
    from megatron_longpo.training.checkpointing import load_checkpoint

    mcfg, g, model, _, opt, sched = _build(extra, seed=5)
    if how == "resume":
        st = load_checkpoint(run_dir, model, opt, sched, g, mcfg)
        it = st.iteration
    elif how == "finetune":
        it = load_checkpoint(run_dir, model, opt, sched, g, mcfg, finetune=True).iteration
    else:
        load_model_checkpoint(run_dir, model, mcfg)
        it = None
    meta = getattr(model.decoder.final_layernorm, "meta", None)
    return it, _weights(model), meta


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Run dirs saved without (local spec) and with (TE-like) extra state, and their weights."""
    out = {}
    for extra in (False, True):
        run = str(tmp_path_factory.mktemp("ckpt") / "run")
        (ref,) = run_distributed(_save, 1, args=(run, extra), timeout=180)
        out[extra] = (run, ref)
    return out


@pytest.mark.parametrize("saved_extra, loaded_extra, how", [
    (False, True, "resume"), (False, True, "finetune"), (False, True, "model"),
    (True, False, "resume"), (True, False, "model"), (True, True, "resume"),
])
def test_load_across_specs(saved, saved_extra, loaded_extra, how):
    run, ref = saved[saved_extra]
    ((it, got, meta),) = run_distributed(_load, 1, args=(run, loaded_extra, how), timeout=180)
    assert it == {"resume": 3, "finetune": 0, "model": None}[how]
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    if loaded_extra:
        # Saved by a TE-like model: its metadata comes back; saved without: the new model's stays.
        assert meta == ({"amax_history": [1.0, 3.0]} if saved_extra else {"amax_history": [5.0, 3.0]})


def _load_broken(run_dir):
    from megatron_longpo.checkpoint import CheckpointError
    from megatron_longpo.training.checkpointing import load_checkpoint

    mcfg, g, model, _, opt, sched = _build(False, seed=5)
    try:
        load_checkpoint(run_dir, model, opt, sched, g, mcfg, verify="none")  # reach torch DCP itself
    except CheckpointError as e:
        return str(e)
    return None


def test_unreadable_shard_is_a_checkpoint_error(saved, tmp_path):
    """torch DCP's CheckpointException (a BaseException) surfaces as CheckpointError with the path."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(saved[False][0], run)
    shards = sorted(Path(run).glob("iter_*/*.distcp"))
    assert shards
    for s in shards:
        s.write_bytes(b"truncated")
    (msg,) = run_distributed(_load_broken, 1, args=(str(run),), timeout=180)
    assert msg is not None and "cannot load" in msg and str(run) in msg
