"""Training checkpoints: model + optimizer + scheduler + RNG + data position.

Built on :mod:`megatron_longpo.checkpoint` (same directory layout and ``longpo_meta.json`` as
converted models, atomic ``iter_N.tmp`` -> ``iter_N`` rename, latest pointer written last), so a
training checkpoint is also a model checkpoint for conversion, precompute and fine-tuning.
What training adds to the sharded state dict:
  optimizer   Megatron optimizer sharded state (fp32 master weights + moments)
  scheduler   OptimizerParamScheduler.state_dict()
  rng_state   one ShardedObject entry per rank (python / numpy / torch / CUDA / tracker states)
and to ``longpo_meta.json`` (``train_state``): iteration, consumed_samples, parallel layout and
the run config. Model weights load into any TP/PP/CP/EP layout (dist_checkpointing reshards).
The plain optimizer's state is stored per parameter under its global key
(:mod:`megatron_longpo.training.optimizer_state`), so a full resume may change TP, PP and EP; the
distributed optimizer's (``dp_reshardable``) may change TP and PP. CP, DP and the world size must
stay (RNG states are per rank), otherwise the load is refused unless ``finetune`` (weights only).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_longpo.checkpoint import (
    CheckpointError,
    check_compatible,
    latest_iteration,
    read_meta,
    resolve_checkpoint_dir,
    save_sharded_checkpoint,
    tokenizer_dir,
)
from megatron_longpo.checkpoint.format import TOKENIZER_DIR, iter_dir_name
from megatron_longpo.checkpoint.integrity import (
    CheckpointCorruptError,
    complete_iterations,
    state_dict_bytes,
    state_dict_numel,
)
from megatron_longpo.checkpoint.retention import prune, set_aside
from megatron_longpo.checkpoint.model_io import load_sharded
from megatron_longpo.config import ModelConfig
from megatron_longpo.runtime.distributed import rank, world_size
from megatron_longpo.runtime.te_state import loading_te_extra_state
from megatron_longpo.training.optimizer_state import load_optimizer_state, sharded_optimizer_state

__all__ = ["CheckpointError", "TrainState", "estimate_save_bytes", "find_checkpoint", "load_checkpoint", "restore_scheduler",
           "resume_point", "resume_with_fallback", "save_training_checkpoint"]


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


def layout_of(groups) -> dict:
    return {"tp": groups.tp_size, "cp": groups.cp_size, "pp": getattr(groups, "pp_size", 1), "dp": groups.dp_size,
            "ep": getattr(groups, "ep_size", 1), "world": world_size()}


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict; under VPP (a list of chunks) one entry per chunk. Keys of
    the stored tensors are global (layer offsets of the stage and chunk), so a checkpoint loads
    into any TP / PP / VPP layout."""
    chunks = _chunks(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(model, state: dict) -> list[str]:
    """Load ``state`` (shaped as :func:`model_sharded_state_dict`); returns the missing keys."""
    chunks = _chunks(model)
    parts = [state] if len(chunks) == 1 else [state[f"chunk{i}"] for i in range(len(chunks))]
    missing = []
    for c, part in zip(chunks, parts):
        missing += c.load_state_dict(part, strict=False)[0]
    return missing


def find_checkpoint(path: str | Path, iteration: Optional[int] = None) -> Optional[Path]:
    """The iteration dir to resume from in run dir ``path``, or None if it holds none yet.

    A directory with only an interrupted ``iter_N.tmp`` save counts as empty (that save never
    completed); a latest pointer to a missing iteration is an error. ``iteration`` picks one
    complete iteration instead of the newest (``checkpoint.load_iteration``).
    """
    p = Path(path)
    if not p.is_dir():
        return None
    if iteration is not None:
        d = p / iter_dir_name(iteration)
        if not (d / "longpo_meta.json").is_file():
            raise CheckpointError(
                f"checkpoint.load_iteration={iteration}: {d} is not a complete checkpoint; complete iterations "
                f"in {p}: {complete_iterations(p) or 'none'}")
        return d
    if latest_iteration(p) is None and not any(p.glob("iter_*/longpo_meta.json")):
        return None
    return resolve_checkpoint_dir(p)


def resume_point(save: Optional[str], load_iteration: Optional[int]) -> Optional[Path]:
    """The iteration of ``checkpoint.save`` a run resumes from, or None: nothing saved there yet,
    so the run starts from ``checkpoint.load`` (or from scratch). ``checkpoint.load_iteration``
    picks in ``checkpoint.save`` once that holds a complete iteration, else in ``checkpoint.load``
    (a new run directory seeded from iteration N of another run)."""
    if not save:
        return None
    own = Path(save).is_dir() and bool(complete_iterations(Path(save)))
    return find_checkpoint(save, load_iteration if own else None)


# Megatron-Core's distributed optimizer falls back to the deprecated 'fully_sharded_model_space'
# without metadata; 'dp_reshardable' is what Megatron-LM 0.16.1 writes by default (fully parallel,
# reshardable over DP only; this project resumes optimizer state into the same layout anyway).
OPTIMIZER_SHARDING = "dp_reshardable"
# The plain optimizer's state, one entry per parameter under its global key (training/optimizer_state.py):
# loads into any TP / PP / EP layout. Checkpoints written before it hold Megatron's own format.
PER_PARAMETER = "per_parameter"
# What a checkpoint that records no type was written with (before the metadata was passed).
LEGACY_OPTIMIZER_SHARDING = "fully_sharded_model_space"
KNOWN_OPTIMIZER_SHARDINGS = (PER_PARAMETER, OPTIMIZER_SHARDING, LEGACY_OPTIMIZER_SHARDING)
# Layout fields a full resume must keep; Megatron's own optimizer format also keeps EP (at EP > 1
# its expert parameters are a second, 'chained_1.'-prefixed optimizer: training/optimizer_state.py).
FIXED_LAYOUT = ("cp", "dp", "world")
FIXED_LAYOUT_MEGATRON_FORMAT = FIXED_LAYOUT + ("ep",)


def is_distributed_optimizer(optimizer) -> bool:
    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_sharding_of(optimizer) -> str:
    """How ``save_training_checkpoint`` stores this optimizer's state."""
    return OPTIMIZER_SHARDING if is_distributed_optimizer(optimizer) else PER_PARAMETER


def optimizer_sharding_metadata(sharding_type: str = OPTIMIZER_SHARDING) -> dict:
    """The ``metadata`` of ``optimizer.sharded_state_dict`` (the plain CPU optimizer ignores it)."""
    return {"distrib_optim_sharding_type": sharding_type}


def saved_optimizer_sharding(train_state: dict, where: str) -> str:
    """The optimizer sharding type a checkpoint was saved with; refuses one this code cannot load."""
    kind = train_state.get("optimizer_sharding", LEGACY_OPTIMIZER_SHARDING)
    if kind not in KNOWN_OPTIMIZER_SHARDINGS:
        raise CheckpointError(
            f"{where}/longpo_meta.json: train_state.optimizer_sharding={kind!r} is not one of "
            f"{list(KNOWN_OPTIMIZER_SHARDINGS)}; it was written by another tool or version (set "
            "checkpoint.finetune=true to load the weights only)")
    return kind


# fp32 state tensors per parameter that the optimizer saves (Adam: two moments; RMSprop: square
# average; SGD: momentum buffer); bf16 / fp16 parameters add an fp32 master copy.
OPTIMIZER_STATES = {"adam": 2, "rmsprop": 1, "sgd": 1}


def estimate_save_bytes(model, optimizer_name: str, params_dtype: str) -> int:
    """This rank's share of the bytes a training checkpoint writes: its main-replica weights as
    stored plus the fp32 optimizer state, known before a step runs (the optimizer's state tensors
    exist only after the first step). Summed over ranks by the free-space check."""
    sd = model_sharded_state_dict(model)  # every VPP chunk
    fp32_per_param = OPTIMIZER_STATES[optimizer_name] + (0 if params_dtype == "fp32" else 1)
    return state_dict_bytes(sd) + 4 * fp32_per_param * state_dict_numel(sd)


SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")


def restore_scheduler(scheduler, saved: dict, mode: str, where: str) -> None:
    """Load a saved OptimizerParamScheduler state under ``optim.scheduler_on_resume`` = ``mode``.

    The step count always comes from the checkpoint. ``checkpoint`` keeps the saved schedule,
    ``config`` takes lr / warm-up / decay from the config (Megatron's
    ``--override-opt_param-scheduler``), ``auto`` refuses when they differ: extending a finished
    cosine run with the saved schedule would train every new step at min_lr.
    """
    fresh = scheduler.state_dict()
    diffs = [f"{k} {saved.get(k)!r} -> {fresh.get(k)!r}" for k in SCHEDULE_KEYS if saved.get(k) != fresh.get(k)]
    if diffs and mode == "auto":
        raise CheckpointError(
            f"{where}: the config's learning-rate schedule differs from the checkpoint's ({', '.join(diffs)}; "
            f"lr_decay_steps follows training.train_iters). Set optim.scheduler_on_resume=config to continue from "
            f"step {saved.get('num_steps')} on the config's schedule, or optim.scheduler_on_resume=checkpoint to keep "
            f"the saved one (after its lr_decay_steps the rate stays at min_lr={saved.get('min_lr')})")
    scheduler.override_opt_param_scheduler = mode == "config"
    scheduler.use_checkpoint_opt_param_scheduler = mode != "config"
    scheduler.load_state_dict(saved)


def resume_with_fallback(
    run_dir: str | Path,
    first: Path,
    load,
    fallback: bool,
    log=print,
) -> tuple[TrainState, Path]:
    """``load(iter_dir)`` on ``first``; if its files are damaged and ``fallback``, on the newest
    intact earlier iteration of ``run_dir`` instead, saying what happened and setting the damaged
    one aside (``iter_N.damaged``: never loaded or counted by retention again). Verification runs
    before any tensor is read, so a damaged iteration leaves the model untouched. Collective."""
    try:
        return load(first), first
    except CheckpointCorruptError as err:
        if not fallback:
            raise
        damaged = err
    current = int(first.name[len("iter_"):])
    for it in reversed([i for i in complete_iterations(Path(run_dir)) if i < current]):
        cand = Path(run_dir) / iter_dir_name(it)
        log(f"[longpo] WARNING: {damaged}\n[longpo] falling back to the previous complete checkpoint {cand}")
        set_aside(damaged.iter_dir, damaged, log)
        try:
            return load(cand), cand
        except CheckpointCorruptError as err:
            damaged = err
    raise damaged


def _rng_object(state: Optional[dict]):
    return ShardedObject("rng_state", state, (world_size(),), (rank(),), replica_id=0)


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _optimizer_entry(optimizer, model_sd: dict, sharding: str, is_loading: bool) -> dict:
    """The optimizer's part of the sharded state dict, in the format ``sharding`` names."""
    if sharding == PER_PARAMETER:
        return sharded_optimizer_state(optimizer, model_sd, is_loading=is_loading)
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=optimizer_sharding_metadata(sharding))


def save_training_checkpoint(
    run_dir: str | Path,
    state: TrainState,
    model,
    optimizer,
    scheduler,
    config: dict,
    groups,
    model_cfg: ModelConfig,
    keep_last: int = 2,
    source_checkpoint: Optional[str] = None,
    data_identity: Optional[dict] = None,
    verify: str = "full",
    log=print,
) -> Path:
    """Save everything needed to resume at ``state.iteration``; keep the newest ``keep_last``
    intact iterations (:func:`megatron_longpo.checkpoint.retention.prune`, ``verify`` its check).

    ``source_checkpoint`` (the converted model the run started from) lends its ``source`` /
    ``tokenizer`` metadata and tokenizer files, so the run directory exports back to HF alone.
    ``data_identity`` (the train_data fingerprint) lets a resume notice a changed dataset.
    """
    sd = {"model": model_sharded_state_dict(model)}
    sharding = optimizer_sharding_of(optimizer)
    sd["optimizer"] = _optimizer_entry(optimizer, sd["model"], sharding, is_loading=False)
    sd["scheduler"] = scheduler.state_dict()
    sd["rng_state"] = _rng_object(_rng_state())
    extra = {"train_state": {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
                             "layout": layout_of(groups), "config": config, "data": data_identity,
                             "optimizer_sharding": sharding}}
    src_tok = None
    if source_checkpoint:
        meta = read_meta(source_checkpoint)
        extra.update({k: meta.extra[k] for k in ("source", "tokenizer") if k in meta.extra})
        src_tok = tokenizer_dir(source_checkpoint)
    final = save_sharded_checkpoint(run_dir, sd, model_cfg, iteration=state.iteration, extra_meta=extra)
    run = Path(run_dir)
    if rank() == 0 and src_tok is not None and not (run / TOKENIZER_DIR).exists():
        shutil.copytree(src_tok, run / TOKENIZER_DIR)
    prune(run, keep_last, verify, log, current=state.iteration)  # collective
    return final


def load_checkpoint(
    ckpt: str | Path,
    model,
    optimizer,
    scheduler,
    groups,
    model_cfg: ModelConfig,
    finetune: bool = False,
    verify: str = "full",
    scheduler_on_resume: str = "checkpoint",
    own_checkpoint: bool = False,
) -> TrainState:
    """Load weights (any layout) and, unless ``finetune`` or the checkpoint is model-only, the
    optimizer, scheduler, RNG and data position. Returns the restored TrainState. The files are
    first checked against their save-time manifest (``verify``: full | size | none).
    ``own_checkpoint``: ``ckpt`` is this run's own ``checkpoint.save`` (resuming): TE may unpickle
    its FP8 state (runtime/te_state.py), and the error advice differs (finetune does not apply)."""
    d = resolve_checkpoint_dir(ckpt)
    meta = read_meta(d)
    check_compatible(meta.model, _chunks(model)[0], model_cfg, str(d))
    ts = meta.extra.get("train_state")
    full = ts is not None and not finetune
    if full:
        saved, now = ts["layout"], layout_of(groups)
        sharding = saved_optimizer_sharding(ts, str(d))
        if sharding == PER_PARAMETER and is_distributed_optimizer(optimizer):
            raise CheckpointError(
                f"{d}: its optimizer state was saved by the plain optimizer; resume it with "
                "optim.use_distributed_optimizer=false, or set checkpoint.finetune=true to load the weights only")
        # TP and PP (and EP with the per-parameter format) may change: parameters and optimizer
        # state are saved under global (layer-offset, expert-index, unsharded-shape) keys that
        # dist_checkpointing reshards (tests/e2e/test_train_pipeline.py, test_train_moe.py).
        fixed = FIXED_LAYOUT if sharding == PER_PARAMETER else FIXED_LAYOUT_MEGATRON_FORMAT
        changed = [k for k in fixed if saved.get(k, 1) != now[k]]
        if changed:
            why = ("its optimizer state resumes only with the same cp/dp and world size (tp, pp and ep may change)"
                   if sharding == PER_PARAMETER else
                   f"its optimizer state (Megatron's own '{sharding}' format: the distributed optimizer's, or the "
                   "plain optimizer's before per-parameter state) resumes only with the same cp/dp/ep and world "
                   "size (tp and pp may change)")
            if own_checkpoint:
                run = d.parent
                raise CheckpointError(
                    f"{d}: checkpoint.save={run} holds a run saved with layout {saved} but this run is {now}; {why}. "
                    f"Resume in that layout, or start a new run directory from its weights: checkpoint.save=NEW_DIR "
                    f"checkpoint.load={run} checkpoint.finetune=true (or delete {run} to start over)")
            raise CheckpointError(
                f"{d}: optimizer state was saved with layout {saved} but this run is {now}; {why}. Resume in that "
                "layout, or set checkpoint.finetune=true to load the weights only into the new layout")
    sd = {"model": model_sharded_state_dict(model)}
    if full:
        sd["optimizer"] = _optimizer_entry(optimizer, sd["model"], sharding, is_loading=True)
        sd["rng_state"] = _rng_object(None)
    # Module _extra_state may be absent either way (local-spec checkpoint into a TE model and back).
    loaded, absent = load_sharded(sd, d, verify=verify)
    if absent:
        raise CheckpointError(
            f"{d} lacks {len(absent)} entr(ies) this run needs, e.g. {absent[:4]}; it was saved by a different "
            "model or optimizer setup (set checkpoint.finetune=true to load the weights only)"
        )
    with loading_te_extra_state(str(d), trusted=own_checkpoint):
        missing = [k for k in _load_model_state(model, loaded["model"]) if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{d} did not provide {missing[:4]} for this model")
    if not full:
        return TrainState()
    if sharding == PER_PARAMETER:
        load_optimizer_state(optimizer, loaded["optimizer"])
    else:
        optimizer.load_state_dict(loaded["optimizer"])
    if "scheduler" in loaded:
        restore_scheduler(scheduler, loaded["scheduler"], scheduler_on_resume, str(d))
    _set_rng_state(loaded["rng_state"])
    return TrainState(iteration=int(ts["iteration"]), consumed_samples=int(ts["consumed_samples"]))
