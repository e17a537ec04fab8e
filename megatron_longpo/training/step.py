"""One LongPO micro-batch forward, and the Megatron-scheduled forward/backward and train step.

Data flow of :func:`microbatch_forward` on one rank:
PairBatch (full sequences) -> zigzag slice for this CP rank -> model hidden states
[s_local(/tp), rows, h] -> per-segment log-prob sums and NLL sums/counts (vocab-parallel,
chunked, summed over CP; :func:`megatron_longpo.loss.forward.rank_segment_logprobs`, the one
model -> log-prob path shared with reference and evaluation) -> :func:`longpo_loss` with the
batch's reference log-probs.

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
from megatron_longpo.data.batch import PairBatch
from megatron_longpo.loss.forward import rank_segment_logprobs
from megatron_longpo.loss.logprobs import host_to_device
from megatron_longpo.loss.longpo import longpo_loss
from megatron_longpo.runtime.capabilities import collective_device
from megatron_longpo.runtime.distributed import ParallelGroups


def validate_batch(batch: PairBatch, groups: ParallelGroups, sequence_parallel: bool, loss_cfg: LossConfig) -> None:
    """Check the PairBatch contract (data/batch.py) and what the loss mode needs, before any model work."""
    batch.validate(groups.cp_size, groups.tp_size, sequence_parallel)
    b = batch.num_pairs
    if loss_cfg.mode != "sft":
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            ref = getattr(batch, name)
            if ref is None:
                raise ValueError(
                    f"loss.mode={loss_cfg.mode} needs PairBatch.{name} (reference log-prob cache: "
                    "reference.cache_path, tools/precompute_reference.py), or use loss.mode=sft"
                )
            if ref.shape != (b,):
                raise ValueError(f"PairBatch.{name} has shape {tuple(ref.shape)}, expected ({b},)")


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
    """LongPO loss of one micro-batch on this rank: (unscaled float64 loss, detached metrics).

    The loss is the same on every TP and CP rank of the micro-batch. ``token_normalizer`` is the
    NLL-token normalizer of ``token_mean`` (see :func:`megatron_longpo.loss.longpo.nll_term`).
    Model inputs (this CP rank's tokens, position ids and, for shared_prefix rows, the branch
    layout passed as ``attention_mask``) come from :meth:`PairBatch.for_cp_rank`, the one CP slice.
    """
    validate_batch(batch, groups, sequence_parallel, loss_cfg)
    # This CP rank's zigzag slices (the one CP slice); ids stay on the host (the log-prob sums plan
    # on them without device syncs) and the branch layout stays on the CPU.
    local = batch.for_cp_rank(groups.cp_rank, groups.cp_size)
    b = batch.num_pairs
    resp, nll = rank_segment_logprobs(
        model, local.tokens, local.position_ids, local.attention_mask,
        local.target_ids, [local.response_segment, local.nll_segment], [2 * b, b], groups,
        vocab_size=vocab_size, sequence_parallel=sequence_parallel, chunk_size=loss_cfg.logprob_chunk_size,
    )
    dev = resp.sums.device
    ref_w = host_to_device(batch.ref_chosen_logps, dev) if batch.ref_chosen_logps is not None else None
    ref_l = host_to_device(batch.ref_rejected_logps, dev) if batch.ref_rejected_logps is not None else None
    return longpo_loss(
        resp.sums[:b],  # P_w [B]
        resp.sums[b:],  # P_l [B]
        ref_w,
        ref_l,
        -nll.sums,  # summed NLL [B]
        nll.counts,
        loss_cfg,
        token_normalizer=token_normalizer,
    )


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


def forward_backward(
    ddp_model: torch.nn.Module,
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
    """Run every micro-batch of this DP rank through Megatron's no-pipelining schedule.

    Leaves the finalised (DP x CP averaged, SP-norm reduced) gradient of the global batch's mean
    loss in the DDP grad buffers (``param.main_grad``) and returns the metrics averaged over
    micro-batches and DP ranks. ``zero_grad`` zeroes the grad buffers first. ``optimizer``
    (a MegatronOptimizer) supplies the loss scale for fp16/bf16. Every DP rank must pass the
    same number of micro-batches of the same size.
    """
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    sizes = {mb.num_pairs for mb in micro_batches}
    if len(sizes) != 1:
        raise ValueError(f"micro-batches must all hold the same number of pairs, got {sorted(sizes)}")
    config = get_model_config(ddp_model)
    if config.calculate_per_token_loss:
        raise ValueError("TransformerConfig.calculate_per_token_loss must be False: the LongPO loss is a per-pair mean")
    if not forward_only:
        # Settings the schedule reads from the model config (as Megatron-LM's training loop does).
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = getattr(ddp_model, "no_sync", None)
        config.grad_scale_func = optimizer.scale_loss if optimizer is not None else None
        if zero_grad:
            ddp_model.zero_grad_buffer()

    normalizer = (
        global_token_normalizer(micro_batches, groups.dp_group) if loss_cfg.nll_reduction == "token_mean" else None
    )

    def forward_step(data_iterator: Iterator[PairBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        loss, metrics = microbatch_forward(
            model, batch, groups, loss_cfg, vocab_size, sequence_parallel,
            token_normalizer=normalizer,
        )

        def loss_func(output: torch.Tensor):
            # Two values: the schedule multiplies by cp and divides by num_microbatches.
            return output, metrics

        return loss, loss_func

    fb = get_forward_backward_func()
    clear_aux_losses_tracker()
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        store = fb(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[ddp_model],
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0].seq_len,
            micro_batch_size=micro_batches[0].num_pairs,
            forward_only=forward_only,
        )
    metrics = average_metrics(store, groups.dp_group)
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
    ddp_model: torch.nn.Module,
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
    ddp_model.zero_grad_buffer()
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
