"""The training loop behind ``pretrain_longpo.py``.

Order of work (every check that can fail does so before the expensive steps):
  1. distributed init, config validation, pre-flight checks (files, cache, checkpoint, output dir)
  2. parallel state, seeds, dataset + reference source, model, DDP, optimizer, scheduler
  3. resume (checkpoint.save has a checkpoint) or initial load (checkpoint.load)
  4. steps: micro-batches of this DP rank -> train_step -> scheduler -> log / eval / save / stop
  5. final checkpoint, summary line
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from megatron_longpo.config import ConfigError, LongPOConfig, config_changes, load_config, to_dict, validate
from megatron_longpo.evaluation.setup import evaluator_from_config
from megatron_longpo.gpu_rules import te_version_notes
from megatron_longpo.loss.longpo import scored_positions
from megatron_longpo.models.provider import build_model_chunks, init_tp_comm_overlap
from megatron_longpo.runtime.capabilities import cuda_available, te_version
from megatron_longpo.runtime.distributed import (
    ParallelGroups,
    destroy,
    init_distributed,
    init_model_parallel,
    set_seed,
)
from megatron_longpo.training import preflight
from megatron_longpo.checkpoint import CheckpointError, read_meta
from megatron_longpo.checkpoint.integrity import remove_leftovers, require_free_space
from megatron_longpo.checkpoint.lock import acquire_run_lock
from megatron_longpo.data.indexed import load_metadata
from megatron_longpo.data.pair_layout import rows_per_pair
from megatron_longpo.reference.fingerprint import dataset_identity, describe_dataset_mismatch
from megatron_longpo.training.checkpointing import (
    TrainState,
    estimate_save_bytes,
    find_checkpoint,
    load_checkpoint,
    resume_point,
    resume_with_fallback,
    save_training_checkpoint,
)
from megatron_longpo.training.data_provider import TrainingData, build_training_data
from megatron_longpo.training.flops import attended_pairs, train_flops
from megatron_longpo.training.metrics_log import MetricsLogger
from megatron_longpo.training.optimizer import build_optimizer, use_distributed_optimizer
from megatron_longpo.training.preemption import StopController
from megatron_longpo.training.step import forward_backward, model_chunks, train_step


@dataclass
class TrainResult:
    iteration: int
    consumed_samples: int
    last_metrics: dict
    checkpoint: Optional[str]
    stopped_by: Optional[str]
    losses: list  # per-step loss, in order (this run only)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _print0(msg: str) -> None:
    if _is_rank0():
        print(msg, flush=True)


def _wrap_ddp(chunks: list, cfg: LongPOConfig) -> list:
    """One Megatron DDP per model chunk (several under VPP; as Megatron-LM, only the first one
    buckets its gradients)."""
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cuda_available(),
        use_distributed_optimizer=use_distributed_optimizer(cfg.optim),
        check_for_nan_in_grad=True,
    )
    return [DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)]


def _build_model(cfg: LongPOConfig) -> list:
    """The policy's chunks on this pipeline rank (one without VPP): cfg.model (its rope_theta
    overrides the checkpoint's), attention per backend."""
    t = cfg.training
    init_tp_comm_overlap(cfg.model, cfg.parallel,  # every row is padded to max_seq_length then
                         cfg.data.max_seq_length * t.micro_batch_size * rows_per_pair(cfg.data.pair_layout))
    return build_model_chunks(cfg.model, cfg.parallel, pair_layout=cfg.data.pair_layout,
                              recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
                              recompute_num_layers=t.recompute_num_layers, recompute_modules=t.recompute_modules,
                              ddp=True)


def train(cfg: LongPOConfig, hard_stop: bool = False) -> TrainResult:
    """Train ``cfg``. ``hard_stop`` (the CLI): a second Ctrl-C ends the process at once, exit 130,
    at any moment including mid-save; a library caller gets KeyboardInterrupt instead."""
    t_start = time.time()
    # Handlers only set a flag, so install them first: a signal during start-up is not lost.
    stop = StopController.from_env(cfg.training.exit_duration_mins, start_time=t_start, hard_stop=hard_stop).install()
    try:
        return _train(cfg, stop, t_start)
    finally:
        stop.uninstall()  # also when start-up fails: the caller's handlers come back


def _train(cfg: LongPOConfig, stop: StopController, t_start: float) -> TrainResult:
    init_distributed(cfg.parallel)
    world = dist.get_world_size()
    validate(cfg, world)
    # One writer per run directory, taken before anything in it is read, removed or written.
    lock = acquire_run_lock(cfg.checkpoint.save) if cfg.checkpoint.save else None
    try:
        return _train_locked(cfg, stop, t_start, world)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: LongPOConfig, stop: StopController, t_start: float, world: int) -> TrainResult:
    preflight.check_before_init(cfg)
    for note in te_version_notes(te_version(), cfg.parallel):  # TE outside setup.py's pin, FP8 resume policy
        _print0(f"[longpo] WARNING: {note}")

    groups = init_model_parallel(cfg.parallel)
    set_seed(cfg.training.seed)
    data = build_training_data(cfg, groups)  # dataset, sampler, reference source (checked)
    if cfg.training.num_epochs is not None:
        cfg.training.train_iters = epochs_to_iters(cfg.training.num_epochs, data.num_samples,
                                                   cfg.training.global_batch_size)
        _print0(f"[longpo] training.num_epochs={cfg.training.num_epochs}: {data.num_samples} samples -> "
                f"train_iters={cfg.training.train_iters}")
        validate(cfg, world)
    evaluator = evaluator_from_config(cfg)  # synthetic long-context tasks (None without evaluation.tasks)
    chunks = _build_model(cfg)
    ddps = _wrap_ddp(chunks, cfg)
    # One module per rank, or the list of its VPP chunks (schedules and checkpoints take both).
    model = chunks[0] if len(chunks) == 1 else chunks
    ddp = ddps[0] if len(ddps) == 1 else ddps
    optimizer, scheduler = build_optimizer(ddps, cfg.optim, cfg.model, cfg.training.train_iters)
    if cfg.checkpoint.save:  # refuse now, not after save_interval steps of GPU time
        require_free_space(Path(cfg.checkpoint.save), estimate_save_bytes(model, cfg.optim.optimizer,
                                                                          cfg.model.params_dtype),
                           "save this run's checkpoints (checked at start-up)")

    data_id = _data_identity(cfg)
    state = _load_or_resume(cfg, model, optimizer, scheduler, groups, data_id)
    start_iteration = state.iteration
    data.set_consumed_samples(state.consumed_samples)
    if start_iteration >= cfg.training.train_iters:
        _print0(f"[longpo] nothing to train: the checkpoint is at step {start_iteration} and training.train_iters="
                f"{cfg.training.train_iters}; raise training.train_iters to continue (the checkpoint is left as it is)")

    if cfg.training.eval_interval and data.has_validation:
        n_steps, n_samples = data.validation_steps(cfg.training.eval_iters)
        if n_steps == 0:
            raise ConfigError(f"data.valid_data={cfg.data.valid_data} has {len(data.valid)} samples, fewer than one "
                              f"global batch ({cfg.training.global_batch_size}); use a larger validation set")
        _print0(f"[longpo] validation every {cfg.training.eval_interval} steps: {n_steps} global batch(es) = "
                f"{n_samples} of {len(data.valid)} samples of {cfg.data.valid_data}")
    logger = MetricsLogger(cfg.logging, cfg.training.train_iters, _is_rank0(), to_dict(cfg), start_step=state.iteration,
                           save_dir=cfg.checkpoint.save)
    _print0(
        f"[longpo] world={world} tp={groups.tp_size} cp={groups.cp_size} pp={groups.pp_size}"
        f"{'' if len(chunks) == 1 else f'x{len(chunks)} (vpp)'} dp={groups.dp_size} "
        f"layout={cfg.data.pair_layout} mode={cfg.loss.mode} reference={data.reference_description} "
        f"samples={data.num_samples} steps {state.iteration}->{cfg.training.train_iters} "
        f"micro-batches/step/rank={data.num_micro_batches}"
    )

    losses: list = []
    last: dict = {}
    stopped_by = None
    last_saved: Optional[Path] = None
    vocab = cfg.model.vocab_size
    sp = cfg.parallel.sequence_parallel
    try:
        while state.iteration < cfg.training.train_iters:
            t0 = time.time()
            micro = data.next_global_batch()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            result = train_step(ddp, optimizer, micro, groups, cfg.loss, vocab, sp)
            scheduler.step(1)
            state.iteration += 1
            state.consumed_samples += cfg.training.global_batch_size
            dt = time.time() - t0
            stop.note_step(dt)
            metrics = dict(result.metrics)
            metrics["lr"] = lr
            metrics["epoch"] = state.consumed_samples / data.num_samples
            metrics.update(_throughput(cfg, micro, dt, groups, world))
            if not math.isfinite(metrics.get("loss", float("nan"))):
                raise FloatingPointError(f"loss is {metrics.get('loss')} at step {state.iteration}; stopping")
            losses.append(metrics["loss"])
            last = metrics
            if start_iteration == 0 and state.iteration == 1:  # this step's forward ran on the starting weights
                _log_step0(cfg, logger, metrics)
            logger.log(state.iteration, metrics)

            if cfg.training.eval_interval and data.has_validation and state.iteration % cfg.training.eval_interval == 0:
                logger.log(state.iteration, _evaluate(cfg, ddp, data, groups), prefix="valid")
            if evaluator is not None and state.iteration % cfg.training.eval_interval == 0:
                logger.log(state.iteration, evaluator.evaluate(ddp, groups).metrics(), prefix="eval")
            save_now = bool(cfg.checkpoint.save and cfg.checkpoint.save_interval
                            and state.iteration % cfg.checkpoint.save_interval == 0)
            stopped_by = stop.should_stop()
            if state.iteration >= cfg.training.train_iters:
                stopped_by = None  # the run is complete: a stop request changes nothing (no requeue)
            if not stopped_by and cfg.training.exit_interval and state.iteration % cfg.training.exit_interval == 0 \
                    and state.iteration < cfg.training.train_iters:
                stopped_by = "exit_interval"
            if (save_now or stopped_by) and cfg.checkpoint.save:
                t_save = time.time()
                last_saved = _save(cfg, state, model, optimizer, scheduler, groups, data_id)
                stop.note_save(time.time() - t_save)
            if stopped_by:
                _print0(f"[longpo] stopping at step {state.iteration} ({stopped_by}); checkpoint: {last_saved}")
                break
        else:
            # Only a run that trained saves at the end: a rerun of a finished run must leave its
            # checkpoint (and the reference caches keyed to its fingerprint) byte-identical.
            trained = state.iteration > start_iteration
            if cfg.checkpoint.save and trained and (
                    last_saved is None or not last_saved.name.endswith(f"{state.iteration:07d}")):
                last_saved = _save(cfg, state, model, optimizer, scheduler, groups, data_id)
    finally:
        stop.uninstall()
        logger.close()
    stop.write_status(stopped_by, state.iteration, str(last_saved) if last_saved else None)
    summary = " ".join(f"{k}={v:.5g}" for k, v in last.items() if k in (
        "loss", "nll_loss", "pref_loss", "rewards/accuracies", "rewards/margins"))
    _print0(f"[longpo] done: step {state.iteration}/{cfg.training.train_iters} {summary} "
            f"elapsed {time.time() - t_start:.1f}s checkpoint: {last_saved}")
    return TrainResult(state.iteration, state.consumed_samples, last, str(last_saved) if last_saved else None,
                       stopped_by, losses)


def step0_metrics(metrics: dict) -> dict:
    """Rewards and log-probs of the first step: its forward ran on the starting weights (the
    reference's), so rewards/margins is the offset before any update: long vs short context and
    RoPE base, plus the numerics of the policy forward (FP8) against the reference cache (bf16)."""
    return {k: v for k, v in metrics.items() if k.startswith(("rewards/", "logps/"))}


def _log_step0(cfg: LongPOConfig, logger: MetricsLogger, metrics: dict) -> None:
    logger.log(0, step0_metrics(metrics), prefix="step0")
    if cfg.parallel.fp8:
        _print0(f"[longpo] step 0 ran the policy in FP8 ({cfg.parallel.fp8}, {cfg.parallel.fp8_recipe}); a reference cache "
                f"computed in bf16 offsets rewards/margins by the FP8 noise summed over each response: precompute it "
                f"with tools/precompute_reference.py --fp8 {cfg.parallel.fp8} --fp8-recipe {cfg.parallel.fp8_recipe}")


def epochs_to_iters(num_epochs: float, num_samples: int, global_batch_size: int) -> int:
    """Optimizer steps for ``num_epochs`` passes over ``num_samples`` (the last step may cross into
    the next pass: the sampler concatenates epochs, docs/data.md)."""
    return max(1, math.ceil(num_epochs * num_samples / global_batch_size))


def _save(cfg, state, model, optimizer, scheduler, groups, data_id: dict) -> Path:
    t = time.time()
    path = save_training_checkpoint(cfg.checkpoint.save, dataclasses.replace(state), model, optimizer, scheduler,
                           to_dict(cfg), groups, model_cfg=cfg.model, keep_last=cfg.checkpoint.keep_last,
                           source_checkpoint=cfg.checkpoint.load, data_identity=data_id,
                           verify=cfg.checkpoint.verify, log=_print0)
    _print0(f"[longpo] saved {path} in {time.time() - t:.1f}s")
    return path


def _data_identity(cfg: LongPOConfig) -> dict:
    """Fingerprint of data.train_data (from its sidecar: no data file is read)."""
    return dataset_identity(load_metadata(cfg.data.train_data), cfg.data.train_data)


def _check_resume(cfg: LongPOConfig, found: Path, data_id: dict) -> bool:
    """Warn about every config change since the checkpoint; refuse a changed dataset unless allowed.
    Returns True when the data position must restart at the first sample."""
    ts = read_meta(found).extra.get("train_state") or {}
    changes = config_changes(ts.get("config") or {}, to_dict(cfg))
    if changes:
        _print0(f"[longpo] WARNING: resuming {found} with {len(changes)} changed option(s): " + "; ".join(changes))
    saved = ts.get("data")
    why = describe_dataset_mismatch(saved, data_id) if saved else None
    if why is None:
        return False
    if not cfg.checkpoint.allow_data_change:
        raise CheckpointError(
            f"checkpoint.save={cfg.checkpoint.save} was trained on other data than data.train_data="
            f"{cfg.data.train_data}: {why}. Its data position ({ts.get('consumed_samples')} samples) belongs to "
            f"{saved.get('prefix')}. Start a new run directory (checkpoint.save=NEW, checkpoint.load="
            f"{cfg.checkpoint.save} to begin from its weights), or set checkpoint.allow_data_change=true to "
            "continue this run on the new data from its first sample")
    _print0(f"[longpo] WARNING: data changed since {found} ({why}); checkpoint.allow_data_change=true: "
            "reading the new data from its first sample")
    return True


def _load_or_resume(cfg: LongPOConfig, model, optimizer, scheduler, groups: ParallelGroups, data_id: dict) -> TrainState:
    """Resume from checkpoint.save if it holds a checkpoint, else initial load from checkpoint.load."""
    c = cfg.checkpoint
    if c.save:
        if _is_rank0():
            remove_leftovers(c.save)
        found = resume_point(c.save, c.load_iteration)
        if found is not None:
            restart_data = _check_resume(cfg, found, data_id)

            def load(d: Path) -> TrainState:
                return load_checkpoint(d, model, optimizer, scheduler, groups, cfg.model, verify=c.verify,
                                       scheduler_on_resume=cfg.optim.scheduler_on_resume, own_checkpoint=True)

            fallback = c.fallback_on_corrupt and c.load_iteration is None
            st, used = resume_with_fallback(c.save, found, load, fallback, log=_print0)
            if restart_data:
                st.consumed_samples = 0
            _print0(f"[longpo] resumed from {used} at step {st.iteration} ({st.consumed_samples} samples consumed)")
            return st
    if c.load:
        src = find_checkpoint(c.load, c.load_iteration) if c.load_iteration is not None else c.load
        st = load_checkpoint(src, model, optimizer, scheduler, groups, cfg.model, finetune=c.finetune,
                             verify=c.verify, scheduler_on_resume=cfg.optim.scheduler_on_resume)
        _print0(f"[longpo] loaded {src} ({'weights only' if c.finetune else 'full state'})")
        return st
    _print0("[longpo] no checkpoint to load: random initialisation")
    return TrainState()


def _throughput(cfg: LongPOConfig, micro, seconds: float, groups: ParallelGroups, world: int) -> dict:
    """Tokens/s (non-padding, this DP rank's micro-batches x dp) and model TFLOP/s per GPU."""
    tokens = sum(mb.num_tokens() for mb in micro) * groups.dp_size
    flops = 0.0
    for mb in micro:
        n_logit = scored_positions(cfg.loss, mb.response_segment, mb.nll_segment)  # what the step scores
        flops += train_flops(cfg.model, mb.num_tokens(), attended_pairs(mb.branch_ids), n_logit)
    flops *= groups.dp_size
    return {"tokens_per_sec": tokens / max(seconds, 1e-9), "tflops_per_gpu": flops / max(seconds, 1e-9) / world / 1e12}


def _evaluate(cfg: LongPOConfig, ddp, data: TrainingData, groups: ParallelGroups) -> dict:
    chunks = model_chunks(ddp)
    for c in chunks:
        c.eval()
    try:
        sums: dict = {}
        batches = data.validation_batches(cfg.training.eval_iters)
        for micro in batches:
            m = forward_backward(ddp, micro, groups, cfg.loss, cfg.model.vocab_size, cfg.parallel.sequence_parallel,
                                 forward_only=True)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / max(len(batches), 1) for k, v in sums.items()}
    finally:
        for c in chunks:
            c.train()


def main(config_path: Optional[str], overrides: list[str]) -> int:
    cfg = load_config(config_path, overrides)
    try:
        train(cfg, hard_stop=True)
    finally:
        destroy()
    return 0
