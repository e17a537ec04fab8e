"""Start-up checks that run before any process group, model or dataset is built.

Each failure raises :class:`PreflightError` naming the option, the path and the fix, so a
misconfigured 512K job dies in seconds on the login-node-visible filesystem instead of after
loading a 7B model on hundreds of GPUs.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from typing import Optional

from megatron_longpo.checkpoint import CheckpointError, check_compatible, read_meta, tokenizer_dir
from megatron_longpo.config import ConfigError, LongPOConfig, ModelConfig
from megatron_longpo.data.checks import check_dataset_files, tokenizer_mismatch
from megatron_longpo.data.indexed import load_metadata
from megatron_longpo.objectives import get_objective
from megatron_longpo.reference import check_reference_cache


class PreflightError(ConfigError):
    """A start-up check failed; the message says what and how to fix it."""


def check_writable(path: str, option: str) -> None:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write_probe_{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"{option}={path} is not writable ({e.strerror}); choose a directory you can write to")


def check_checkpoint_compatible(path: str, model: ModelConfig, option: str, shapes: bool = True) -> None:
    """The checkpoint exists and is complete; with ``shapes``, its weights fit ``model``
    (rope_theta may differ). The reference model keeps its own config, so only existence counts."""
    if not Path(path).exists():
        raise PreflightError(f"{option}={path} does not exist; convert a HF model with tools/convert_hf_to_megatron.py "
                             f"or point {option} at a run directory")
    try:
        meta = read_meta(path)
        if shapes:
            check_compatible(meta.model, None, model, f"{option}={path}")
    except CheckpointError as e:
        raise PreflightError(str(e)) from e


def _model_tokenizer_dir(cfg: LongPOConfig) -> Optional[tuple[str, Path]]:
    """(checkpoint, its tokenizer directory) of the model this run trains: the run being resumed
    (checkpoint.save) if it has a checkpoint, else checkpoint.load; None when neither ships one."""
    for path in (cfg.checkpoint.save, cfg.checkpoint.load):
        if not path or not Path(path).exists():
            continue
        try:
            tdir = tokenizer_dir(path)
        except CheckpointError:
            continue  # not (yet) a checkpoint: an empty save directory
        if tdir is not None:
            return path, tdir
    return None


def check_tokenizer_matches_model(cfg: LongPOConfig) -> None:
    """The data was tokenized the way the model reads text (its checkpoint's tokenizer)."""
    if not cfg.data.check_tokenizer:
        return
    found = _model_tokenizer_dir(cfg)
    if found is None:
        return  # no tokenizer shipped with the model
    ckpt, tdir = found
    why = tokenizer_mismatch(load_metadata(cfg.data.train_data), "data.train_data", cfg.data.train_data, ckpt, tdir,
                             disable="data.check_tokenizer=false")
    if why:
        raise PreflightError(why)


def check_before_init(cfg: LongPOConfig) -> None:
    """Every check that needs no process group: files present, checkpoint fits, outputs writable.
    (The world-size rules are config.validate(cfg, world_size)'s.)"""
    d = cfg.data
    if not d.train_data:
        raise PreflightError("data.train_data is not set; preprocess with tools/preprocess_data.py and pass "
                             "--data.train_data=OUTPUT_PREFIX")
    check_dataset_files(d.train_data, "data.train_data")
    if d.valid_data:
        check_dataset_files(d.valid_data, "data.valid_data")
    check_tokenizer_matches_model(cfg)
    r = cfg.reference
    if get_objective(cfg.loss.mode).needs_reference:
        if r.source == "cache":
            # Every cache check (present, complete, same dataset / tokenizer / mode / reference
            # checkpoint) on files only; the error names the mismatch and the rebuild command.
            check_reference_cache(cfg, d.train_data)
            if d.valid_data:
                check_reference_cache(cfg, d.valid_data)
        else:
            if not r.load:
                raise PreflightError("reference.source=online needs reference.load (the reference checkpoint)")
            check_checkpoint_compatible(r.load, cfg.model, "reference.load", shapes=False)
    c = cfg.checkpoint
    if c.load:
        check_checkpoint_compatible(c.load, cfg.model, "checkpoint.load")
    if c.save:
        check_writable(c.save, "checkpoint.save")
    if c.save_interval is not None and c.save_interval <= 0:
        raise PreflightError("checkpoint.save_interval must be > 0 (or null to save only at the end)")
    if cfg.logging.tensorboard_dir:
        check_writable(cfg.logging.tensorboard_dir, "logging.tensorboard_dir")
    lg = cfg.logging
    if lg.wandb_project and lg.wandb_mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise PreflightError(f"logging.wandb_project={lg.wandb_project} but wandb is not installed: "
                             "pip install 'megatron_longpo[wandb]', or unset logging.wandb_project")
    if cfg.training.eval_interval and not d.valid_data and not cfg.evaluation.tasks:
        raise PreflightError("training.eval_interval is set but data.valid_data is not (nor evaluation.tasks)")
