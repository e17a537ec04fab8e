"""Model -> per-segment log-prob sums (and argmax matches): the one forward of training, reference
and evaluation.

Two steps, so that a pipelined model runs the first on every stage and the second on the last
stage only (Megatron's ``forward_step`` / ``loss_func`` contract, training/step.py):
:func:`stage_forward` (model -> this stage's output, the final hidden states on the last stage)
and :func:`hidden_segment_logprobs` (final hidden states -> per-segment statistics with
:func:`segment_logprob_sums`: chunked, vocab-parallel, summed over CP; never a [S, V] tensor).
:func:`rank_segment_logprobs` is the two in a row (reference precompute, evaluation); on a
pipelined model it runs them through Megatron's forward-only schedule and returns the last
stage's statistics on every stage.
Target and segment ids stay on the host, so the reduction plans on them without a device sync
(megatron_longpo/testing/syncs.py counts this for the training step). With ``argmax=True`` it
also counts, per segment, the positions whose target token is the argmax of the full-vocabulary
logits (:func:`vocab_parallel_target_is_argmax`: per chunk a local max over this TP rank's vocab
shard, one all-gather over TP of (local max, target logit), no gradient). Teacher-forced exact
match of a segment is ``matches == counts``.

Callers pass this CP rank's slice, cut once by the batch (``PairBatch.for_cp_rank`` /
``ReferenceBatch.for_cp_rank``, data/batch.py): training/step.py, reference/compute.py and
evaluation/scoring.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_longpo.loss.logprobs import (
    DEFAULT_CHUNK_SIZE,
    _rank_size,
    all_reduce_sum,
    host_to_device,
    plan_rows,
    segment_logprob_sums,
)
from megatron_longpo.runtime.distributed import ParallelGroups


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The LongPOGPTModel inside DDP / Float16Module wrappers (it has ``output_weight()``)."""
    m = model
    while not hasattr(m, "output_weight") and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, "output_weight"):
        raise TypeError(f"{type(model).__name__} does not wrap a LongPOGPTModel (no output_weight())")
    return m


@torch.no_grad()
def vocab_parallel_target_is_argmax(
    rows: torch.Tensor,  # [N, h], identical on every TP rank
    weight: torch.Tensor,  # [V_pad/tp, h] this rank's vocab shard
    targets: torch.Tensor,  # [N] int64 global ids in [0, vocab_size)
    *,
    vocab_size: int,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """[N] bool: is ``targets[i]`` the argmax over the true vocabulary of rows[i] @ W_full.T?

    A tie with the maximum counts as a match (measure zero for real logits). Padded vocabulary
    rows (id >= vocab_size) are never candidates. Same chunking and shard arithmetic as
    :class:`megatron_longpo.loss.logprobs._VocabParallelTargetLogProb`.
    """
    tp_rank, tp_size = _rank_size(tp_group)
    n, v_local = rows.shape[0], weight.shape[0]
    start = tp_rank * v_local
    n_valid = max(0, min(v_local, vocab_size - start))
    cdtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    w = weight[:n_valid]
    tgt = targets - start
    in_shard = (tgt >= 0) & (tgt < n_valid)
    tgt = torch.where(in_shard, tgt, torch.zeros_like(tgt))
    # local[0]: max logit of this shard; local[1]: target logit if this shard owns it, else -inf.
    local = torch.full((2, n), float("-inf"), dtype=cdtype, device=rows.device)
    if n_valid > 0:
        for c0 in range(0, n, chunk_size):
            c1 = min(n, c0 + chunk_size)
            logits = (rows[c0:c1] @ w.t()).to(cdtype)  # [c, n_valid]
            local[0, c0:c1] = logits.amax(dim=1)
            picked = logits.gather(1, tgt[c0:c1, None]).squeeze(1)
            local[1, c0:c1] = torch.where(in_shard[c0:c1], picked, torch.full_like(picked, float("-inf")))
            del logits
    if tp_size > 1 and n > 0:
        parts = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(parts, local, group=tp_group)
        gathered = torch.stack(parts)  # [tp, 2, N]
        top, target_logit = gathered[:, 0].amax(dim=0), gathered[:, 1].amax(dim=0)
    else:
        top, target_logit = local[0], local[1]
    return target_logit >= top


@dataclass
class SegmentStats:
    """Per-segment results of one segment set (identical on every TP and CP rank)."""

    sums: torch.Tensor  # [n] float64 sum of target log-probs (differentiable)
    counts: torch.Tensor  # [n] float64 number of target positions
    argmax_matches: Optional[torch.Tensor] = None  # [n] float64 positions whose target is the argmax

    @property
    def exact_match(self) -> torch.Tensor:
        """[n] bool: every position of the segment is an argmax match (teacher-forced greedy)."""
        if self.argmax_matches is None:
            raise ValueError("argmax matches were not computed; call rank_segment_logprobs(..., argmax=True)")
        return (self.argmax_matches == self.counts) & (self.counts > 0)


def stage_forward(
    model: torch.nn.Module,
    tokens: torch.Tensor,  # [rows, S/cp] int64, this CP rank's zigzag slice (host or device)
    position_ids: torch.Tensor,  # [rows, S/cp] int64
    attention_mask: Optional[torch.Tensor],  # None (causal) or a branch layout [rows, 2] (CPU, full rows)
) -> torch.Tensor:
    """Model -> this pipeline stage's output [S/cp(/tp with SP), rows, h].

    Without pipeline parallelism (or on the last stage) that is the final hidden states after the
    final norm; on an earlier stage the activations sent to the next stage (its input comes from
    the previous stage through ``set_input_tensor``, Megatron's schedule). Token inputs are copied
    to the model's device without blocking the host.
    """
    inner = unwrap_model(model)
    if attention_mask is not None and not getattr(inner, "explicit_rope", False):
        # Megatron's default attention is plainly causal and its RoPE ignores position_ids:
        # the rejected branch would attend to the chosen branch and get the wrong positions.
        raise ValueError(
            "data.pair_layout=shared_prefix needs the project attention (parallel.attention_backend="
            "auto|sdpa|flash and build_model(..., pair_layout='shared_prefix'))"
        )
    dev = next(inner.parameters()).device
    return model(host_to_device(tokens, dev), host_to_device(position_ids, dev), attention_mask, return_hidden=True)


def hidden_segment_logprobs(
    model: torch.nn.Module,
    hidden: torch.Tensor,  # [S/cp(/tp), rows, h] final hidden states (last pipeline stage)
    target_ids: torch.Tensor,  # [rows, S/cp] int64, host (CPU) for a sync-free step
    segment_ids: Sequence[torch.Tensor],  # K x [rows, S/cp] int64: segment id or -1 (host)
    num_segments: Sequence[int],
    groups: ParallelGroups,
    *,
    vocab_size: int,
    sequence_parallel: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    argmax: bool = False,
) -> list[SegmentStats]:
    """Final hidden states -> per-segment statistics with ``model``'s output layer, summed over CP
    (identical on every TP and CP rank). Runs on the last pipeline stage only (the one holding the
    output layer): Megatron's ``loss_func`` step.

    Collective over the TP and CP groups. Differentiable in ``sums`` unless called under
    ``torch.no_grad()``.
    """
    weight = unwrap_model(model).output_weight()  # [V_pad/tp, h]
    results = segment_logprob_sums(
        hidden, weight, target_ids, segment_ids, num_segments, vocab_size=vocab_size, tp_group=groups.tp_group,
        cp_group=groups.cp_group, sequence_parallel=sequence_parallel, chunk_size=chunk_size,
    )
    if not argmax:
        return [SegmentStats(r.sums, r.counts) for r in results]
    with torch.no_grad():
        matches = _segment_argmax_matches(hidden, weight, target_ids, segment_ids, num_segments, vocab_size, groups,
                                          sequence_parallel, chunk_size)
    return [SegmentStats(r.sums, r.counts, m) for r, m in zip(results, matches)]


def rank_segment_logprobs(
    model: torch.nn.Module,
    tokens: torch.Tensor,  # [rows, S/cp] int64, this CP rank's zigzag slice (host or device)
    position_ids: torch.Tensor,  # [rows, S/cp] int64
    attention_mask: Optional[torch.Tensor],  # None (causal) or a branch layout [rows, 2] (CPU, full rows)
    target_ids: torch.Tensor,  # [rows, S/cp] int64, host (CPU) for a sync-free step
    segment_ids: Sequence[torch.Tensor],  # K x [rows, S/cp] int64: segment id or -1 (host)
    num_segments: Sequence[int],
    groups: ParallelGroups,
    *,
    vocab_size: int,
    sequence_parallel: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    argmax: bool = False,
) -> list[SegmentStats]:
    """:func:`stage_forward` then :func:`hidden_segment_logprobs`: per-segment statistics, summed
    over CP. On a pipelined model (``groups.pp_size > 1``, this rank's stage) the two run through
    a forward-only schedule (no gradient) and every stage gets the last stage's statistics.

    Collective over the TP and CP groups. Differentiable in ``sums`` unless called under
    ``torch.no_grad()``.
    """
    if groups.pp_size > 1:
        return _pipelined_segment_logprobs(model, tokens, position_ids, attention_mask, target_ids, segment_ids,
                                           num_segments, groups, vocab_size=vocab_size,
                                           sequence_parallel=sequence_parallel, chunk_size=chunk_size, argmax=argmax)
    hidden = stage_forward(model, tokens, position_ids, attention_mask)
    return hidden_segment_logprobs(model, hidden, target_ids, segment_ids, num_segments, groups,
                                   vocab_size=vocab_size, sequence_parallel=sequence_parallel,
                                   chunk_size=chunk_size, argmax=argmax)


@torch.no_grad()
def _pipelined_segment_logprobs(model, tokens, position_ids, attention_mask, target_ids, segment_ids, num_segments,
                                groups: ParallelGroups, *, vocab_size: int, sequence_parallel: bool, chunk_size: int,
                                argmax: bool) -> list[SegmentStats]:
    """:func:`rank_segment_logprobs` on one pipeline stage (``model``: this stage, not interleaved):
    Megatron's forward-only schedule over one micro-batch, the statistics computed on the last
    stage (``loss_func`` with ``collect_non_loss_data``) and sent to every stage. No gradient."""
    if isinstance(model, (list, tuple)):
        raise ValueError("the reference / evaluation forward takes one model chunk per stage (no VPP)")

    def forward_step(_data, chunk):
        out = stage_forward(chunk, tokens, position_ids, attention_mask)

        def collect(hidden, non_loss_data=True):
            stats = hidden_segment_logprobs(chunk, hidden, target_ids, segment_ids, num_segments, groups,
                                            vocab_size=vocab_size, sequence_parallel=sequence_parallel,
                                            chunk_size=chunk_size, argmax=argmax)
            return [SegmentStats(r.sums.cpu(), r.counts.cpu(),
                                 None if r.argmax_matches is None else r.argmax_matches.cpu()) for r in stats]

        return out, collect

    rows, s_local = tokens.shape
    store = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=s_local * groups.cp_size, micro_batch_size=rows, forward_only=True, collect_non_loss_data=True,
    )
    box = [store[0] if groups.is_last_stage else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(groups.pp_group, groups.pp_size - 1), group=groups.pp_group)
    return box[0]


def _segment_argmax_matches(hidden, weight, target_ids, segs, num_segments, vocab_size, groups: ParallelGroups,
                            sequence_parallel: bool, chunk_size: int) -> list[torch.Tensor]:
    """Per segment set: [n] float64 counts of argmax-matching positions, summed over CP."""
    tp_size = groups.tp_size
    if tp_size > 1 and sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=groups.tp_group)
    b, s = target_ids.shape
    h = hidden.shape[-1]
    dev = hidden.device
    plan = plan_rows(target_ids.cpu(), [seg.cpu() for seg in segs], num_segments, vocab_size)  # same rows as the sums
    rows = hidden.reshape(s * b, h).index_select(0, host_to_device(plan.idx, dev))
    hit = vocab_parallel_target_is_argmax(rows, weight, host_to_device(plan.targets, dev), vocab_size=vocab_size,
                                          tp_group=groups.tp_group, chunk_size=chunk_size).to(torch.float64)  # [N]
    parts = [hit.new_zeros(n + 1).index_add_(0, host_to_device(sel, dev), hit)[:n]
             for sel, n in zip(plan.sets, num_segments)]
    total = all_reduce_sum(torch.cat(parts), groups.cp_group if groups.cp_size > 1 else None)
    out, off = [], 0
    for n in num_segments:
        out.append(total[off: off + n])
        off += n
    return out
