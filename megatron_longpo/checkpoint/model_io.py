"""Save / load model weights as a Megatron dist checkpoint that loads at any TP / CP size.

Collective: every rank of the default process group calls these functions. Saving writes
``RUN/iter_N.tmp`` then renames it to ``RUN/iter_N`` and updates the latest pointer last.
Training extends a checkpoint by passing a bigger sharded state dict (model + optimizer +
scheduler) to :func:`save_sharded_checkpoint` and its own keys through ``extra_meta``.

Scripts that save must have an ``if __name__ == "__main__":`` guard: even the synchronous
torch_dist writer of megatron-core 0.16 starts a spawn-context multiprocessing Manager (results
queue), which re-imports ``__main__``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_longpo.checkpoint.format import (
    LATEST_FILE,
    META_FILE,
    CheckpointError,
    CheckpointMeta,
    iter_dir_name,
    latest_iteration,
    new_meta,
    read_meta,
    resolve_checkpoint_dir,
    write_text_atomic,
)
from megatron_longpo.checkpoint.integrity import check_free_space, mark_verified, verify_checkpoint, write_manifest
from megatron_longpo.config import ModelConfig
from megatron_longpo.fsutil import fsync_path
from megatron_longpo.runtime.distributed import rank
from megatron_longpo.runtime.signals import start_checkpoint_helpers
from megatron_longpo.runtime.te_state import loading_te_extra_state

log = logging.getLogger(__name__)

# Fields that decide parameter shapes / presence: a mismatch makes the checkpoint unusable.
STRUCTURAL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "head_dim", "vocab_size", "add_qkv_bias", "tie_word_embeddings",
)
# Fields a run may legitimately change (LongPO raises rope_theta / max positions): reported only.
SOFT_FIELDS = ("arch", "rope_theta", "rope_scaling", "max_position_embeddings", "norm_epsilon")


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CheckpointSaveError(CheckpointError, OSError):
    """Writing a checkpoint failed (an OSError such as a full disk), said in one line."""


def save_sharded_checkpoint(
    ckpt_dir: str | Path,
    sharded_state_dict: dict,
    model_cfg: ModelConfig,
    iteration: int = 0,
    extra_meta: Optional[dict] = None,
    sharded_strategy: Optional[SaveShardedStrategy] = None,
) -> Path:
    """Atomically save ``sharded_state_dict`` as ``ckpt_dir/iter_<iteration>``; returns that dir.

    ``sharded_strategy``: a torch_dist strategy in place of megatron's default (conversion's
    streaming one, convert/megatron_model.py); it must not need megatron's writer helper."""
    if not dist.is_initialized():
        raise RuntimeError("save_sharded_checkpoint needs torch.distributed (init_distributed) to be initialised")
    run = Path(ckpt_dir)
    final = run / iter_dir_name(iteration)
    tmp = run / f"{final.name}.tmp"
    meta = new_meta(model_cfg, iteration, extra_meta)  # validates extra_meta on every rank first
    check_free_space(run, sharded_state_dict, iteration)  # before anything is written
    if rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
        tmp.mkdir()
    _barrier()
    if sharded_strategy is None:
        start_checkpoint_helpers()  # Megatron's writer helper must outlive a preemption signal
    try:
        dist_checkpointing.save(sharded_state_dict, str(tmp), sharded_strategy=sharded_strategy)  # collective
        write_manifest(tmp)  # collective: sizes + CRC32 of every file, verified at load
    except (OSError, CheckpointException) as e:
        # ENOSPC mid-write: torch DCP gathers the writers' errors into a CheckpointException (a
        # BaseException whose str() is every rank's traceback). Said in one line; the partial
        # directory goes (a rank still writing cannot resurrect it as complete: it lacks the
        # manifest and meta, and the next start removes any leftover).
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(
            f"saving iteration {iteration} to {run} failed ({_first_line(e)}); the partial {tmp.name} was removed "
            f"and earlier checkpoints are untouched{_newest_hint(run)}") from e
    if rank() == 0:
        write_text_atomic(tmp / META_FILE, json.dumps(meta.to_json(), indent=2) + "\n")
        old = run / f"{final.name}.old"
        if final.exists():  # re-saving an iteration: keep the old one until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        write_text_atomic(run / LATEST_FILE, f"{iteration}\n")
        shutil.rmtree(old, ignore_errors=True)
        fsync_path(run)
    _barrier()
    mark_verified(final)  # hashed from the bytes just written: retention counts it as intact
    return final


def _newest_hint(run: Path) -> str:
    latest = latest_iteration(run) if run.is_dir() else None
    return f" (the newest, iter_{latest:07d}, is intact)" if latest is not None else ""


def save_model_checkpoint(
    ckpt_dir: str | Path,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    iteration: int = 0,
    extra_meta: Optional[dict] = None,
) -> Path:
    """Save the weights of ``model`` (a GPTModel on the current TP/CP groups)."""
    return save_sharded_checkpoint(ckpt_dir, model.sharded_state_dict(), model_cfg, iteration, extra_meta)


def _is_extra_state(key: str) -> bool:
    # Module extra state (TE's FP8 scaling metadata; None for local layers). A checkpoint saved
    # with the local spec lacks the TE core-attention one: fresh FP8 metadata is correct there.
    return key.endswith("_extra_state")


def load_sharded(sharded_state_dict: dict, iter_dir: str | Path, *, verify: str = "full") -> tuple[dict, list[str]]:
    """The one verified read of checkpoint tensors: every reader (training, reference precompute,
    evaluation, export, generation's ``--model RUN``) loads through here.

    Collective. First checks the files against the manifest written at save (``verify``: full |
    size | none; :func:`verify_checkpoint`), naming every damaged file and the earlier iteration to
    use instead, before a tensor is read. Then ``dist_checkpointing.load``, tolerating module
    ``_extra_state`` in either direction.

    Returns (loaded state, keys the request has but the checkpoint lacks, ``_extra_state``
    excepted). Checkpoint content the request does not ask for is skipped (a TE checkpoint's FP8
    metadata into a local-spec model, optimizer state into a model-only load), and requested keys
    the checkpoint lacks are removed from the request before reading instead of failing inside
    DCP (a local-spec checkpoint into a TE model: TE's FP8 metadata starts fresh, which is what
    a new run needs). Every failure, including torch DCP's ``CheckpointException`` (a
    BaseException, which ``except Exception`` misses), becomes a CheckpointError naming the path.
    """
    verify_checkpoint(iter_dir, verify)
    try:
        loaded, _, absent = dist_checkpointing.load(
            sharded_state_dict, str(iter_dir), strict=StrictHandling.RETURN_UNEXPECTED
        )
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(f"cannot load {iter_dir}: {_first_line(e)}") from e
    return loaded, sorted(k for k in absent if not _is_extra_state(k))


def _first_line(e: BaseException, limit: int = 500) -> str:
    """The cause in one line: torch DCP's CheckpointException carries each rank's (exception,
    stack) pair, and its str() is every rank's whole traceback."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        cause = first[0] if isinstance(first, tuple) else first
        text = f"{type(cause).__name__}: {' '.join(str(cause).split())} (rank {min(failures)})"
    else:
        text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def model_fields(model: torch.nn.Module) -> dict[str, Any]:
    """Structural fields readable from a built GPTModel (vocab_size is the padded one)."""
    c = model.config
    return {
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.ffn_hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_query_groups or c.num_attention_heads,
        "head_dim": c.kv_channels,
        "add_qkv_bias": bool(c.add_qkv_bias),
        "tie_word_embeddings": bool(model.share_embeddings_and_output_weights),
        "norm_epsilon": c.layernorm_epsilon,
    }


def check_compatible(ckpt: ModelConfig, model: torch.nn.Module, model_cfg: Optional[ModelConfig], where: str) -> list[str]:
    """Raise CheckpointError naming the first structural field that differs; return soft differences."""
    if model_cfg is not None:
        have = {f: getattr(model_cfg, f) for f in STRUCTURAL_FIELDS + SOFT_FIELDS}
    else:
        have = model_fields(model)
    for f in STRUCTURAL_FIELDS:
        if f not in have:
            continue
        want = getattr(ckpt, f)
        if have[f] != want:
            raise CheckpointError(
                f"checkpoint {where} does not fit the model: model.{f} is {have[f]!r} but the checkpoint "
                f"has {want!r}; set model.{f}={want!r} (read_model_config() gives the checkpoint's model section)"
            )
    if model_cfg is None and getattr(model, "vocab_size", ckpt.vocab_size) < ckpt.vocab_size:
        raise CheckpointError(
            f"checkpoint {where} does not fit the model: the model's (padded) vocabulary has "
            f"{model.vocab_size} rows but the checkpoint has vocab_size {ckpt.vocab_size}"
        )
    return [
        f"model.{f}: checkpoint {getattr(ckpt, f)!r}, model {have[f]!r}"
        for f in SOFT_FIELDS
        if f in have and have[f] != getattr(ckpt, f)
    ]


def load_model_checkpoint(
    ckpt_dir: str | Path,
    model: torch.nn.Module,
    model_cfg: Optional[ModelConfig] = None,
    *,
    strict: bool = True,
    verify: str = "full",
) -> CheckpointMeta:
    """Load weights saved by :func:`save_sharded_checkpoint` into ``model`` at the current TP/CP layout.

    ``ckpt_dir`` is a run dir (its latest pointer is followed) or an iteration dir. The
    checkpoint's ModelConfig is checked against ``model_cfg`` (or, without it, against what the
    built model reveals) before any tensor is read. ``strict`` fails when the model has a tensor
    the checkpoint lacks (module ``_extra_state`` excepted, so a checkpoint written with the
    local layer spec loads into a Transformer Engine model); extra checkpoint content (optimizer
    state) is always allowed. Values may be stored in another dtype than the model's (e.g. bf16
    -> fp32); they are cast on load. ``verify`` (full | size | none) checks the files against the
    manifest written at save first (collective), naming any damaged file.
    """
    iter_dir = resolve_checkpoint_dir(ckpt_dir)
    meta = read_meta(iter_dir)
    soft = check_compatible(meta.model, model, model_cfg, str(iter_dir))
    if soft and rank() == 0:
        log.warning("loading %s into a model that differs in: %s", iter_dir, "; ".join(soft))
    sharded = model.sharded_state_dict()
    loaded, absent_tensors = load_sharded(sharded, iter_dir, verify=verify)
    if absent_tensors and strict:
        raise CheckpointError(
            f"checkpoint {iter_dir} lacks {len(absent_tensors)} tensor(s) the model has, e.g. "
            f"{absent_tensors[:4]}; pass strict=False to keep their initial values"
        )
    with loading_te_extra_state(str(iter_dir)):  # FP8 state of other runs: TE's own default policy
        missing, _ = model.load_state_dict(loaded, strict=False)
    missing = sorted(k for k in missing if not _is_extra_state(k))
    if missing and strict:
        raise CheckpointError(f"checkpoint {iter_dir} did not provide {missing[:4]}")
    if (absent_tensors or missing) and rank() == 0:
        log.warning("checkpoint %s lacks model tensors (kept as initialised): %s", iter_dir, (absent_tensors or missing)[:8])
    return meta


__all__ = [
    "CheckpointError", "check_compatible", "load_model_checkpoint", "load_sharded",
    "save_sharded_checkpoint", "save_model_checkpoint", "STRUCTURAL_FIELDS", "SOFT_FIELDS", "LATEST_FILE",
]
