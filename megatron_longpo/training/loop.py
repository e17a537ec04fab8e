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

import torch
import torch.distributed as dist

from megatron_longpo.config import LongPOConfig, to_dict, validate
from megatron_longpo.runtime.distributed import (
    ParallelGroups,
    destroy,
    init_distributed,
    init_model_parallel,
    set_seed,
)
from megatron_longpo.training import preflight
from megatron_longpo.training.checkpointing import TrainState, find_checkpoint, load_checkpoint, save_checkpoint
from megatron_longpo.training.data_provider import TrainingData, build_training_data
from megatron_longpo.training.flops import attended_pairs, train_flops
from megatron_longpo.training.metrics_log import MetricsLogger
from megatron_longpo.training.optimizer import build_optimizer, use_distributed_optimizer
from megatron_longpo.training.preemption import StopController
from megatron_longpo.training.step import train_step, forward_backward


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


def _wrap_ddp(model, cfg: LongPOConfig):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=torch.cuda.is_available(),
        use_distributed_optimizer=use_distributed_optimizer(cfg.optim),
        check_for_nan_in_grad=True,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def _build_model(cfg: LongPOConfig):
    """The policy: cfg.model (its rope_theta overrides the checkpoint's), attention per backend."""
    from megatron_longpo.models.provider import build_model

    t = cfg.training
    return build_model(cfg.model, cfg.parallel, pair_layout=cfg.data.pair_layout,
                       recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
                       recompute_num_layers=t.recompute_num_layers, ddp=True)


def train(cfg: LongPOConfig) -> TrainResult:
    t_start = time.time()
    init_distributed(cfg.parallel)
    world = dist.get_world_size()
    validate(cfg, world)
    preflight.check_before_init(cfg, world)

    groups = init_model_parallel(cfg.parallel)
    set_seed(cfg.training.seed)
    data = build_training_data(cfg, groups)  # dataset, sampler, reference source (checked)
    model = _build_model(cfg)
    ddp = _wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer([ddp], cfg.optim, cfg.model, cfg.training.train_iters)

    state = _load_or_resume(cfg, model, optimizer, scheduler, groups)
    data.set_consumed_samples(state.consumed_samples)

    stop = StopController(cfg.training.exit_duration_mins, start_time=t_start).install()
    logger = MetricsLogger(cfg.logging, cfg.training.train_iters, _is_rank0(), to_dict(cfg), start_step=state.iteration)
    _print0(
        f"[longpo] world={world} tp={groups.tp_size} cp={groups.cp_size} dp={groups.dp_size} "
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
            metrics = dict(result.metrics)
            metrics["lr"] = lr
            metrics.update(_throughput(cfg, micro, dt, groups, world))
            if not math.isfinite(metrics.get("loss", float("nan"))):
                raise FloatingPointError(f"loss is {metrics.get('loss')} at step {state.iteration}; stopping")
            losses.append(metrics["loss"])
            last = metrics
            logger.log(state.iteration, metrics)

            if cfg.training.eval_interval and data.has_validation and state.iteration % cfg.training.eval_interval == 0:
                logger.log(state.iteration, _evaluate(cfg, ddp, data, groups), prefix="valid")
            save_now = bool(cfg.checkpoint.save and cfg.checkpoint.save_interval
                            and state.iteration % cfg.checkpoint.save_interval == 0)
            stopped_by = stop.should_stop()
            if not stopped_by and cfg.training.exit_interval and state.iteration % cfg.training.exit_interval == 0 \
                    and state.iteration < cfg.training.train_iters:
                stopped_by = "exit_interval"
            if (save_now or stopped_by) and cfg.checkpoint.save:
                last_saved = _save(cfg, state, model, optimizer, scheduler, groups)
            if stopped_by:
                _print0(f"[longpo] stopping at step {state.iteration} ({stopped_by}); checkpoint: {last_saved}")
                break
        else:
            if cfg.checkpoint.save and (last_saved is None or not last_saved.name.endswith(f"{state.iteration:07d}")):
                last_saved = _save(cfg, state, model, optimizer, scheduler, groups)
    finally:
        stop.uninstall()
        logger.close()
    summary = " ".join(f"{k}={v:.5g}" for k, v in last.items() if k in (
        "loss", "nll_loss", "pref_loss", "rewards/accuracies", "rewards/margins"))
    _print0(f"[longpo] done: step {state.iteration}/{cfg.training.train_iters} {summary} "
            f"elapsed {time.time() - t_start:.1f}s checkpoint: {last_saved}")
    return TrainResult(state.iteration, state.consumed_samples, last, str(last_saved) if last_saved else None,
                       stopped_by, losses)


def _save(cfg, state, model, optimizer, scheduler, groups) -> Path:
    t = time.time()
    path = save_checkpoint(cfg.checkpoint.save, dataclasses.replace(state), model, optimizer, scheduler,
                           to_dict(cfg), groups, model_cfg=cfg.model, keep_last=cfg.checkpoint.keep_last,
                           source_checkpoint=cfg.checkpoint.load)
    _print0(f"[longpo] saved {path} in {time.time() - t:.1f}s")
    return path


def _load_or_resume(cfg: LongPOConfig, model, optimizer, scheduler, groups: ParallelGroups) -> TrainState:
    """Resume from checkpoint.save if it holds a checkpoint, else initial load from checkpoint.load."""
    if cfg.checkpoint.save:
        found = find_checkpoint(cfg.checkpoint.save)
        if found is not None:
            st = load_checkpoint(found, model, optimizer, scheduler, groups, cfg.model)
            _print0(f"[longpo] resumed from {found} at step {st.iteration} ({st.consumed_samples} samples consumed)")
            return st
    if cfg.checkpoint.load:
        st = load_checkpoint(cfg.checkpoint.load, model, optimizer, scheduler, groups, cfg.model,
                             finetune=cfg.checkpoint.finetune)
        _print0(f"[longpo] loaded {cfg.checkpoint.load} ({'weights only' if cfg.checkpoint.finetune else 'full state'})")
        return st
    _print0("[longpo] no checkpoint to load: random initialisation")
    return TrainState()


def _throughput(cfg: LongPOConfig, micro, seconds: float, groups: ParallelGroups, world: int) -> dict:
    """Tokens/s (non-padding, this DP rank's micro-batches x dp) and model TFLOP/s per GPU."""
    tokens = sum(mb.num_tokens() for mb in micro) * groups.dp_size
    flops = 0.0
    for mb in micro:
        n_logit = int(((mb.response_segment >= 0) | (mb.nll_segment >= 0)).sum())
        flops += train_flops(cfg.model, mb.num_tokens(), attended_pairs(mb.branch_ids), n_logit)
    flops *= groups.dp_size
    return {"tokens_per_sec": tokens / max(seconds, 1e-9), "tflops_per_gpu": flops / max(seconds, 1e-9) / world / 1e12}


def _evaluate(cfg: LongPOConfig, ddp, data: TrainingData, groups: ParallelGroups) -> dict:
    ddp.eval()
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
        ddp.train()


def main(config_path: Optional[str], overrides: list[str]) -> int:
    from megatron_longpo.config import load_config

    cfg = load_config(config_path, overrides)
    try:
        train(cfg)
    finally:
        destroy()
    return 0
