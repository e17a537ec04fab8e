"""The frozen reference model: its checkpoint, its OWN model config, and loading it at any TP.

A reference checkpoint is a megatron_longpo checkpoint (``longpo_meta.json`` + dist checkpoint):
a converted model (``tools/convert_hf_to_megatron.py``) or a training checkpoint of a previous
LongPO iteration (same layout, optimizer state is ignored). Its model config comes from the
checkpoint, never from the training config: LongPO's reference is the starting model with its
ORIGINAL RoPE base while the policy trains with a larger one. ``rope_theta`` overrides it for the
rare case that needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from megatron.core import tensor_parallel

from megatron_longpo.checkpoint import load_model_checkpoint
from megatron_longpo.checkpoint.format import META_FILE, CheckpointError, read_meta, resolve_checkpoint_dir
from megatron_longpo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_longpo.models.provider import build_model
from megatron_longpo.reference.fingerprint import CheckpointIdentity, checkpoint_fingerprint


class ReferenceModelError(ConfigError):
    """The reference checkpoint is missing, incomplete or does not describe its model."""


@dataclass(frozen=True)
class ReferenceCheckpoint:
    iter_dir: Path
    model: ModelConfig  # as stored in the checkpoint
    identity: CheckpointIdentity


def read_reference_checkpoint(path: str | Path, option: str = "--load") -> ReferenceCheckpoint:
    """Locate the iteration directory, read its model config and compute its identity (no tensors)."""
    p = Path(path)
    if not p.exists():
        raise ReferenceModelError(
            f"{option}={p} does not exist; convert a HF model with tools/convert_hf_to_megatron.py "
            "or point it at a checkpoint run / iteration directory"
        )
    try:
        iter_dir = resolve_checkpoint_dir(p)
        meta = read_meta(iter_dir)
    except CheckpointError as e:
        raise ReferenceModelError(f"{option}={p}: {e}") from e
    ident = CheckpointIdentity(
        path=str(iter_dir.resolve()), iteration=meta.iteration, fingerprint=checkpoint_fingerprint(iter_dir, META_FILE),
    )
    return ReferenceCheckpoint(iter_dir=iter_dir, model=meta.model, identity=ident)


def effective_model_config(
    ckpt: ReferenceCheckpoint, *, rope_theta: Optional[float] = None, params_dtype: Optional[str] = None
) -> ModelConfig:
    """The checkpoint's own config, with the explicit overrides (None keeps the stored value)."""
    cfg = ckpt.model
    if rope_theta is not None:
        cfg = dataclasses.replace(cfg, rope_theta=float(rope_theta))
    if params_dtype is not None:
        cfg = dataclasses.replace(cfg, params_dtype=params_dtype)
    return cfg


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch and Megatron-tracker RNG states afterwards.

    Building a model draws random init values; the reference model's weights are then overwritten
    by the checkpoint, and the policy's init (and dropout streams) must not depend on whether a
    reference model was built first (cache vs online runs must be identical).
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = {k: v.clone() for k, v in tracker.get_states().items()}
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        tracker.set_states(states)


def load_reference_model(
    ckpt: ReferenceCheckpoint, model_cfg: ModelConfig, parallel: ParallelConfig, keep_fp8: bool = False
) -> torch.nn.Module:
    """Build ``model_cfg`` on the current TP/CP groups, load the checkpoint, freeze it (eval, no grads).

    FP8 is off unless ``keep_fp8`` (precompute --fp8: the reference forward in the policy's recipe).

    Collective over the default process group (dist_checkpointing.load).
    """
    with preserved_rng():
        model = build_model(model_cfg, parallel if keep_fp8 else dataclasses.replace(parallel, fp8=None))
    load_model_checkpoint(ckpt.iter_dir, model, model_cfg)  # extra content (optimizer state) is ignored
    model.eval()
    model.requires_grad_(False)
    return model
