"""Training checkpoints: model + optimizer + scheduler + RNG + data position, atomically.

Layout of a run directory (same as model-only checkpoints of tools/convert_hf_to_megatron.py,
so either kind loads as a model):

    RUN/
      latest_checkpointed_iteration.txt     # written last: "42"
      iter_0000042/                         # megatron dist_checkpointing directory
        metadata.json, common.pt, *.distcp  # model (+ optimizer) sharded tensors
        train_state.json                    # iteration, consumed_samples, config, layout
        rng/rank_00000.pt ...               # per-rank RNG states

A checkpoint is written into ``iter_XXXXXXX.tmp`` and renamed only after every rank finished, and
the ``latest`` pointer is replaced atomically after the rename, so a crash or preemption during a
save never leaves a checkpoint that looks complete. Old checkpoints beyond ``keep_last`` are
deleted only after the new one is in place.

Model weights load into any TP/CP layout (dist_checkpointing reshards). Optimizer state is
restored when the layout matches the one it was saved with; otherwise it is an error unless
``finetune`` (weights only) is set.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest_checkpointed_iteration.txt"
TRAIN_STATE = "train_state.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or incompatible; the message says which and why."""


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def resolve_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """An iteration directory from a run dir (via the latest pointer) or an iteration dir itself.

    Returns None when ``path`` is a run directory without any finished checkpoint.
    """
    p = Path(path)
    if (p / "metadata.json").is_file():
        return p
    latest = p / LATEST
    if latest.is_file():
        text = latest.read_text().strip()
        try:
            it = int(text)
        except ValueError:
            raise CheckpointError(f"{latest}: expected an iteration number, found {text!r}")
        d = p / iter_dir_name(it)
        if not (d / "metadata.json").is_file():
            raise CheckpointError(
                f"{latest} points to {d.name}, which is missing or incomplete (no metadata.json); "
                f"restore it or fix the pointer to an existing iter_* directory"
            )
        return d
    finished = [d for d in p.glob("iter_*") if (d / "metadata.json").is_file()] if p.is_dir() else []
    if not finished:
        return None  # nothing saved yet (an interrupted *.tmp save does not count)
    # Renamed iter dirs are complete (the rename follows every rank's write); the pointer may be
    # missing only if the job died between the rename and the pointer update.
    return max(finished, key=lambda d: d.name)


def read_train_state(ckpt_dir: Path) -> Optional[dict]:
    f = Path(ckpt_dir) / TRAIN_STATE
    return json.loads(f.read_text()) if f.is_file() else None


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0

    def to_dict(self) -> dict:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

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
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def layout_of(groups) -> dict:
    return {"tp": groups.tp_size, "cp": groups.cp_size, "dp": groups.dp_size,
            "world": dist.get_world_size() if dist.is_initialized() else 1}


def _sharded_state(model, optimizer, with_optimizer: bool, is_loading: bool) -> dict:
    sd = {"model": model.sharded_state_dict()}
    if with_optimizer and optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=is_loading)
    return sd


def save_checkpoint(
    run_dir: str | os.PathLike,
    state: TrainState,
    model,
    optimizer,
    scheduler,
    config: dict,
    groups,
    keep_last: int = 2,
) -> Path:
    """Save a full training checkpoint of ``model`` (unwrapped GPTModel) at ``state.iteration``."""
    from megatron.core import dist_checkpointing

    run = Path(run_dir)
    final = run / iter_dir_name(state.iteration)
    tmp = run / (iter_dir_name(state.iteration) + ".tmp")
    if _rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of an interrupted save
        tmp.mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    sd = _sharded_state(model, optimizer, True, is_loading=False)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(sd, str(tmp))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    if _rank() == 0:
        meta = {"format_version": FORMAT_VERSION, **state.to_dict(), "layout": layout_of(groups),
                "config": config, "has_optimizer": optimizer is not None}
        (tmp / TRAIN_STATE).write_text(json.dumps(meta, indent=2, default=str))
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = run / (LATEST + ".tmp")
        pointer_tmp.write_text(str(state.iteration))
        os.replace(pointer_tmp, run / LATEST)
        _prune(run, keep_last, keep=final.name)
    _barrier()
    return final


def _prune(run: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    done = sorted(d for d in run.glob("iter_*") if d.is_dir() and not d.name.endswith(".tmp"))
    for d in done[:-keep_last]:
        if d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    model,
    optimizer=None,
    scheduler=None,
    groups=None,
    finetune: bool = False,
) -> TrainState:
    """Load weights (any layout) and, unless ``finetune``, optimizer/scheduler/RNG/data position.

    Returns the restored TrainState (iteration 0 / consumed 0 with ``finetune`` or for a
    model-only checkpoint).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    d = resolve_checkpoint(ckpt_dir)
    if d is None:
        raise CheckpointError(f"no checkpoint found at {ckpt_dir}")
    meta = read_train_state(d) or {}
    full = not finetune and meta.get("has_optimizer", False) and optimizer is not None
    if full and groups is not None and meta.get("layout"):
        saved, now = meta["layout"], layout_of(groups)
        if any(saved[k] != now[k] for k in ("tp", "cp", "dp")):
            raise CheckpointError(
                f"{d}: optimizer state was saved with layout {saved} but this run is {now}; resume with the "
                f"same tp/cp/dp, or set checkpoint.finetune=true to load the weights only into the new layout"
            )
    sd = _sharded_state(model, optimizer, full, is_loading=True)
    try:
        loaded = dist_checkpointing.load(sd, str(d), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and what was expected
        raise CheckpointError(f"cannot load {d} into this model: {e}") from e
    model.load_state_dict(loaded["model"], strict=True)
    if not full:
        return TrainState()
    optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    rng_file = d / "rng" / f"rank_{_rank():05d}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(iteration=int(meta.get("iteration", 0)), consumed_samples=int(meta.get("consumed_samples", 0)))
