"""One LongPO micro-batch forward, and the Megatron-scheduled forward/backward and train step.

Data flow of one micro-batch, in two steps (Megatron's ``forward_step`` / ``loss_func``):
1. every pipeline stage, :func:`microbatch_stage_forward`: PairBatch (full sequences) -> zigzag
   slice for this CP rank -> this stage's layers (loss/forward.stage_forward) -> stage output
   [s_local(/tp), rows, h], the final hidden states on the last stage;
2. the last stage only, :func:`microbatch_objective`: hidden states -> per-segment log-prob sums
   and NLL sums/counts (vocab-parallel, chunked, summed over CP;
   loss/forward.hidden_segment_logprobs, the path shared with reference and evaluation; only the
   segments the objective's terms need, megatron_longpo/objectives.py) -> :func:`longpo_loss` with
   the batch's reference log-probs.
Under PP every micro-batch of a step is padded to the step's longest (one exchanged shape) and
the schedule gets the model's row count (two_sequences: 2 per pair).

Scaling (derived in docs/loss.md): the micro-batch returns its plain mean loss L_m, identical on
every TP and CP rank. Megatron's schedule (two-value loss_func path) multiplies it by cp and
divides by the number of micro-batches M; DDP sums the gradients over DP x CP and divides by
dp * cp. The result is the gradient of (1 / (dp * M)) * sum_m L_m, the mean loss over the
global batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core.utils import get_model_config

from megatron_longpo.config import LossConfig
from megatron_longpo.data.batch import CPSlice, PairBatch
from megatron_longpo.loss.forward import hidden_segment_logprobs, stage_forward
from megatron_longpo.loss.logprobs import host_to_device
from megatron_longpo.loss.longpo import longpo_loss, scored_segments
from megatron_longpo.objectives import get_objective
from megatron_longpo.runtime.capabilities import collective_device
from megatron_longpo.runtime.distributed import ParallelGroups


def validate_batch(batch: PairBatch, groups: ParallelGroups, sequence_parallel: bool, loss_cfg: LossConfig) -> None:
    """Check the PairBatch contract (data/batch.py) and what the objective needs, before any model work."""
    batch.validate(groups.cp_size, groups.tp_size, sequence_parallel)
    b = batch.num_pairs
    if get_objective(loss_cfg.mode).needs_reference:
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            ref = getattr(batch, name)
            if ref is None:
                raise ValueError(
                    f"loss.mode={loss_cfg.mode} needs PairBatch.{name} (reference log-prob cache: "
                    "reference.cache_path, tools/precompute_reference.py), or use loss.mode=sft"
                )
            if ref.shape != (b,):
                raise ValueError(f"PairBatch.{name} has shape {tuple(ref.shape)}, expected ({b},)")


def microbatch_objective(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    batch: PairBatch,
    local: CPSlice,
    groups: ParallelGroups,
    loss_cfg: LossConfig,
    vocab_size: int,
    sequence_parallel: bool,
    *,
    token_normalizer: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Final hidden states of one micro-batch -> (unscaled float64 loss, detached metrics).

    The last pipeline stage's half of the step (Megatron's ``loss_func``): per-segment log-prob
    sums of this CP rank's slice ``local`` (vocab-parallel, chunked, summed over CP), then the
    objective with the batch's reference log-probs. Identical on every TP and CP rank.
    """
    b = batch.num_pairs
    # Only the segments the objective's terms need (a zero-weight NLL is not scored).
    segments, counts = scored_segments(loss_cfg, local.response_segment, local.nll_segment, b)
    stats = hidden_segment_logprobs(
        model, hidden, local.target_ids, segments, counts, groups,
        vocab_size=vocab_size, sequence_parallel=sequence_parallel, chunk_size=loss_cfg.logprob_chunk_size,
    )
    resp, nll = stats[0], (stats[1] if len(stats) > 1 else None)
    dev = resp.sums.device
    ref_w = host_to_device(batch.ref_chosen_logps, dev) if batch.ref_chosen_logps is not None else None
    ref_l = host_to_device(batch.ref_rejected_logps, dev) if batch.ref_rejected_logps is not None else None
    return longpo_loss(
        resp.sums[:b],  # P_w [B]
        resp.sums[b:],  # P_l [B]
        ref_w,
        ref_l,
        -nll.sums if nll is not None else None,  # summed NLL [B]
        nll.counts if nll is not None else None,
        loss_cfg,
        token_normalizer=token_normalizer,
    )


def microbatch_stage_forward(model: torch.nn.Module, batch: PairBatch, groups: ParallelGroups,
                             loss_cfg: LossConfig, sequence_parallel: bool) -> tuple[torch.Tensor, CPSlice]:
    """Check the batch, cut this CP rank's slice (the one CP slice) and run this pipeline stage:
    (stage output, the slice). Ids stay on the host (the log-prob sums plan on them without
    device syncs) and the branch layout on the CPU."""
    validate_batch(batch, groups, sequence_parallel, loss_cfg)
    local = batch.for_cp_rank(groups.cp_rank, groups.cp_size)
    return stage_forward(model, local.tokens, local.position_ids, local.attention_mask), local


def microbatch_forward(
    model: torch.nn.Module,
    batch: PairBatch,
    groups: ParallelGroups,
    loss_cfg: LossConfig,
    vocab_size: int,
    sequence_parallel: bool,
    *,
    token_normalizer: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LongPO loss of one micro-batch on a model that is not pipelined: (unscaled float64 loss,
    detached metrics), :func:`microbatch_stage_forward` then :func:`microbatch_objective`.

    The loss is the same on every TP and CP rank of the micro-batch. ``token_normalizer`` is the
    NLL-token normalizer of ``token_mean`` (see :func:`megatron_longpo.loss.longpo.nll_term`).
    """
    hidden, local = microbatch_stage_forward(model, batch, groups, loss_cfg, sequence_parallel)
    return microbatch_objective(model, hidden, batch, local, groups, loss_cfg, vocab_size, sequence_parallel,
                                token_normalizer=token_normalizer)


def global_token_normalizer(micro_batches: Sequence[PairBatch], dp_group: Optional[dist.ProcessGroup]) -> float:
    """Mean NLL-token count per micro-batch over the global batch (all DP ranks).

    Every micro-batch divides its NLL sum by this, so the mean over micro-batches of the
    ``token_mean`` NLL is the NLL of all tokens of the global batch pooled.
    """
    counts = torch.tensor(
        [float(sum(int((mb.nll_segment >= 0).sum()) for mb in micro_batches)), float(len(micro_batches))],
        dtype=torch.float64,
    )
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        counts = counts.to(collective_device(dp_group))
        dist.all_reduce(counts, group=dp_group)
    tokens, n_mb = counts.tolist()
    return max(tokens, 1.0) / max(n_mb, 1.0)


def average_metrics(per_microbatch: Sequence[Mapping[str, torch.Tensor]], dp_group: Optional[dist.ProcessGroup]) -> dict[str, float]:
    """Mean of each metric over all micro-batches of all DP ranks.

    Each micro-batch metric is a mean over its B pairs, and every micro-batch holds the same B,
    so this equals the metric computed on the whole global batch at once. TP and CP ranks hold
    identical values and are not averaged over.
    """
    if not per_microbatch:
        return {}
    keys = list(per_microbatch[0])
    for m in per_microbatch:
        if list(m) != keys:
            raise ValueError(f"micro-batches report different metrics: {keys} vs {list(m)}")
    # One stacked tensor: a single device->host copy per step (not one per metric per micro-batch).
    dev = next((v.device for m in per_microbatch for v in m.values() if isinstance(v, torch.Tensor)),
               torch.device("cpu"))
    stacked = torch.stack([torch.stack([torch.as_tensor(m[k], dtype=torch.float64, device=dev).detach().reshape(())
                                        for k in keys]) for m in per_microbatch])  # [M, K]
    count = torch.tensor([float(len(per_microbatch))], dtype=torch.float64, device=dev)
    local = torch.cat([stacked.sum(0), count])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        local = local.to(collective_device(dp_group))
        dist.all_reduce(local, group=dp_group)
    vals = local.cpu().tolist()
    return {k: v / vals[-1] for k, v in zip(keys, vals[:-1])}


def model_chunks(model: Any) -> list[torch.nn.Module]:
    """The list of model chunks Megatron's schedules take (one, or one per virtual stage)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def common_length(micro_batches: Sequence[PairBatch]) -> list[PairBatch]:
    """Every micro-batch padded to the step's longest (pipeline stages exchange one shape)."""
    s = max(mb.seq_len for mb in micro_batches)
    return [mb.padded_to(s) for mb in micro_batches]


def broadcast_last_stage(metrics: dict[str, float], groups: ParallelGroups) -> dict[str, float]:
    """The last pipeline stage's metrics on every stage (only it runs the objective), so logging
    and the loss-is-nan stop see the same values on every rank."""
    if groups.pp_size == 1:
        return metrics
    box = [metrics]
    dist.broadcast_object_list(box, src=dist.get_global_rank(groups.pp_group, groups.pp_size - 1),
                               group=groups.pp_group)
    return box[0]


def forward_backward(
    ddp_model: Any,
    micro_batches: Sequence[PairBatch],
    groups: ParallelGroups,
    loss_cfg: LossConfig,
    vocab_size: int,
    sequence_parallel: bool,
    *,
    forward_only: bool = False,
    zero_grad: bool = True,
    optimizer: Any = None,
) -> dict[str, float]:
    """Run every micro-batch of this DP rank through Megatron's schedule for this layout
    (no pipelining, 1F1B with PP > 1, interleaved 1F1B with VPP; ``get_forward_backward_func``).

    ``ddp_model`` is the DDP-wrapped model, or the list of this PP rank's chunks under VPP.
    Every stage runs :func:`microbatch_stage_forward`; the last one also the objective
    (:func:`microbatch_objective`, the schedule's ``loss_func``). Leaves the finalised (DP x CP
    averaged, SP-norm and tied-embedding reduced) gradient of the global batch's mean loss in the
    DDP grad buffers (``param.main_grad``) and returns the metrics averaged over micro-batches and
    DP ranks, on every stage. ``zero_grad`` zeroes the grad buffers first. ``optimizer`` (a
    MegatronOptimizer) supplies the loss scale for fp16/bf16. Every DP rank must pass the same
    number of micro-batches of the same size.
    """
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    sizes = {mb.num_pairs for mb in micro_batches}
    if len(sizes) != 1:
        raise ValueError(f"micro-batches must all hold the same number of pairs, got {sorted(sizes)}")
    chunks = model_chunks(ddp_model)
    config = get_model_config(chunks[0])
    if config.calculate_per_token_loss:
        raise ValueError("TransformerConfig.calculate_per_token_loss must be False: the LongPO loss is a per-pair mean")
    if groups.pp_size > 1:
        micro_batches = common_length(micro_batches)
    if not forward_only:
        # Settings the schedule reads from the model config (as Megatron-LM's training loop does).
        config.finalize_model_grads_func = finalize_model_grads
        no_sync = [getattr(c, "no_sync", None) for c in chunks]
        config.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
        config.grad_scale_func = optimizer.scale_loss if optimizer is not None else None
        if zero_grad:
            for c in chunks:
                c.zero_grad_buffer()

    normalizer = (
        global_token_normalizer(micro_batches, groups.dp_group) if loss_cfg.nll_reduction == "token_mean" else None
    )

    def forward_step(data_iterator: Iterator[PairBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        output, local = microbatch_stage_forward(model, batch, groups, loss_cfg, sequence_parallel)

        def loss_func(hidden: torch.Tensor):
            # Last stage only. Two values: the schedule multiplies by cp and divides by num_microbatches.
            return microbatch_objective(model, hidden, batch, local, groups, loss_cfg, vocab_size, sequence_parallel,
                                        token_normalizer=normalizer)

        return output, loss_func

    fb = get_forward_backward_func()
    clear_aux_losses_tracker()
    data = iter(micro_batches) if len(chunks) == 1 else [iter(micro_batches) for _ in chunks]
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        store = fb(
            forward_step_func=forward_step,
            data_iterator=data,
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0].seq_len,
            micro_batch_size=int(micro_batches[0].tokens.shape[0]),  # model rows (2 per pair: two_sequences)
            forward_only=forward_only,
        )
    metrics = broadcast_last_stage(average_metrics(store, groups.dp_group), groups)
    # ---- MoE load-balancing loss (objective term; i22) -------------------------------------------
    # Megatron's router adds model.moe_aux_loss_coeff * aux to the objective's gradient itself
    # (MoEAuxLossAutoScaler, scaled by cp / num_microbatches like the main loss, then DDP's mean);
    # here the term's value joins the metrics. ``loss`` stays the LongPO objective.
    if not forward_only and config.num_moe_experts and config.moe_aux_loss_coeff:
        metrics["moe/aux_loss"] = moe_aux_loss(config.moe_aux_loss_coeff, len(micro_batches))
    return metrics


def moe_aux_loss(coeff: float, num_microbatches: int) -> float:
    """coeff * (load-balancing loss summed over MoE layers), averaged over micro-batches and DP
    ranks (each layer's value summed over its TP x CP token shards first, as Megatron computes it)."""
    tracker = get_moe_layer_wise_logging_tracker()
    if "load_balancing_loss" not in tracker:
        return 0.0
    reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    value = float(tracker["load_balancing_loss"]["values"].sum()) * coeff / num_microbatches
    clear_aux_losses_tracker()
    return value


@dataclass
class StepResult:
    """Outcome of one optimizer step."""

    metrics: dict[str, float]  # averaged over the global batch (see average_metrics)
    update_successful: bool  # False when fp16 loss scaling found inf/nan and skipped the step
    grad_norm: Optional[float]  # total gradient norm before clipping (None if not computed)
    num_zeros_in_grad: Optional[int] = None


def train_step(
    ddp_model: Any,
    optimizer: Any,
    micro_batches: Sequence[PairBatch],
    groups: ParallelGroups,
    loss_cfg: LossConfig,
    vocab_size: int,
    sequence_parallel: bool,
) -> StepResult:
    """One optimizer step on this DP rank's micro-batches of the global batch.

    Zeroes the grad buffers, runs :func:`forward_backward`, then ``optimizer.step()`` (a
    MegatronOptimizer: returns (update_successful, grad_norm, num_zeros_in_grad)). The learning
    rate scheduler is the caller's.
    """
    for c in model_chunks(ddp_model):
        c.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = forward_backward(
        ddp_model, micro_batches, groups, loss_cfg, vocab_size, sequence_parallel,
        zero_grad=False, optimizer=optimizer,
    )
    update_successful, grad_norm, num_zeros = optimizer.step()
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return StepResult(
        metrics=metrics,
        update_successful=bool(update_successful),
        grad_norm=None if grad_norm is None else float(grad_norm),
        num_zeros_in_grad=None if num_zeros is None else int(num_zeros),
    )
