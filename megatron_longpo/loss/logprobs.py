"""Per-segment sums of target log-probs from final hidden states, without [seq, vocab] logits.

Pipeline of :func:`segment_logprob_sums` on one (TP rank, CP rank):

1. TP layout of the hidden states. Every TP rank needs every needed position, because each rank
   owns a slice of the vocabulary. With sequence parallelism the [s_local/tp, b, h] shards are
   all-gathered over TP (backward: reduce-scatter, i.e. sum the per-vocab-shard partial
   gradients and keep this rank's shard); without it the replicated [s_local, b, h] passes an
   identity whose backward all-reduces over TP. This is what Megatron's output layer does.
2. Only needed rows: positions with a segment id >= 0 in ANY of the segment sets are gathered
   into rows [N, h] (one log-prob computation serves the response sums and the NLL).
3. Chunked vocab-parallel log-softmax (:class:`_VocabParallelTargetLogProb`): per chunk of
   positions, logits [chunk, V_local] are formed, reduced to a local log-sum-exp and the target
   logit, and dropped. Padded vocabulary rows (global id >= vocab_size) are never multiplied.
   One all-gather over TP of the [2, N] local (logsumexp, target logit) pairs combines the vocab
   shards: lse = logsumexp over ranks, target = sum over ranks (only the owner contributes).
   Backward recomputes each chunk's logits, so the extra memory is O(chunk x V_local) in both
   passes. This is the same math as Megatron's ``vocab_parallel_cross_entropy``, with the
   max / sum-exp reductions folded into one collective.
4. Scatter into segment sums (float64) and counts; on CP > 1 all-reduce them over the CP group
   with an identity backward (:func:`all_reduce_sum`).

Process groups are arguments (None = no parallelism in that dimension); nothing here reads
Megatron's global parallel state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_longpo.config import DEFAULT_LOGPROB_CHUNK_SIZE as DEFAULT_CHUNK_SIZE  # the one default (config.py)


def _rank_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in fp32 (fp64 if the inputs already are): bf16 logits lose the tail."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _VocabParallelTargetLogProb(torch.autograd.Function):
    """log softmax(rows @ W_full[:vocab_size].T)[i, targets[i]] for vocab-sharded W, chunked.

    rows [N, h] and targets [N] must be identical on every TP rank; weight is this rank's
    [V_local, h] vocab shard (rows tp_rank*V_local ...). Output: [N] in the compute dtype.
    The returned gradient for ``rows`` is this shard's PARTIAL gradient (sum over TP is the
    caller's TP mapping); the gradient for ``weight`` is complete for this shard.
    """

    @staticmethod
    def forward(ctx, rows, weight, targets, vocab_size, tp_group, chunk_size):
        tp_rank, tp_size = _rank_size(tp_group)
        n, v_local = rows.shape[0], weight.shape[0]
        start = tp_rank * v_local
        n_valid = max(0, min(v_local, vocab_size - start))  # real (non-padding) vocab rows here
        cdtype = _compute_dtype(rows.dtype)
        w = weight[:n_valid]  # [n_valid, h]
        tgt = targets - start  # [N] local column of the target (valid where in_shard)
        in_shard = (tgt >= 0) & (tgt < n_valid)
        tgt = torch.where(in_shard, tgt, torch.zeros_like(tgt))

        # local[0]: log-sum-exp over this shard's columns; local[1]: target logit or 0.
        local = torch.zeros(2, n, dtype=cdtype, device=rows.device)
        if n_valid == 0:
            local[0].fill_(float("-inf"))
        else:
            for c0 in range(0, n, chunk_size):
                c1 = min(n, c0 + chunk_size)
                logits = (rows[c0:c1] @ w.t()).to(cdtype)  # [c, n_valid]
                picked = logits.gather(1, tgt[c0:c1, None]).squeeze(1)
                local[1, c0:c1] = torch.where(in_shard[c0:c1], picked, torch.zeros_like(picked))
                m = logits.amax(dim=1)  # [c]
                s = logits.sub_(m[:, None]).exp_().sum(dim=1)  # in place: one [c, V] buffer
                local[0, c0:c1] = m + s.log()
                del logits
        if tp_size > 1 and n > 0:
            parts = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(parts, local, group=tp_group)  # list form: same API on every torch/backend
            gathered = torch.stack(parts)  # [tp, 2, N]
            lse = torch.logsumexp(gathered[:, 0], dim=0)  # [N]
            target_logit = gathered[:, 1].sum(dim=0)  # [N]
        else:
            lse, target_logit = local[0], local[1]
        ctx.save_for_backward(rows, weight, tgt, in_shard, lse)
        ctx.n_valid = n_valid
        ctx.chunk_size = chunk_size
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad_logp):  # grad_logp [N]
        rows, weight, tgt, in_shard, lse = ctx.saved_tensors
        n_valid, chunk = ctx.n_valid, ctx.chunk_size
        cdtype = lse.dtype
        grad_rows = torch.zeros_like(rows)
        grad_weight = torch.zeros_like(weight)
        if n_valid == 0 or rows.shape[0] == 0:
            return grad_rows, grad_weight, None, None, None, None
        w = weight[:n_valid]
        # Accumulate the weight gradient in the compute dtype over chunks (bf16 sums drift).
        gw = grad_weight[:n_valid] if weight.dtype == cdtype else torch.zeros(
            n_valid, weight.shape[1], dtype=cdtype, device=weight.device
        )
        g_all = grad_logp.to(cdtype)
        for c0 in range(0, rows.shape[0], chunk):
            c1 = min(rows.shape[0], c0 + chunk)
            rc = rows[c0:c1]
            g = g_all[c0:c1]
            # d logp_i / d logit_iv = 1[v = t_i] - p_iv
            dlogits = (rc @ w.t()).to(cdtype).sub_(lse[c0:c1, None]).exp_().mul_(-g[:, None])  # [c, n_valid]
            own = torch.where(in_shard[c0:c1], g, torch.zeros_like(g))
            dlogits.scatter_add_(1, tgt[c0:c1, None], own[:, None])
            dl = dlogits.to(weight.dtype)
            grad_rows[c0:c1] = dl @ w
            if gw.dtype == dl.dtype:
                gw.addmm_(dl.t(), rc)
            else:
                gw.add_((dl.t() @ rc).to(cdtype))
            del dlogits, dl
        if gw.data_ptr() != grad_weight.data_ptr():
            grad_weight[:n_valid] = gw.to(weight.dtype)
        return grad_rows, grad_weight, None, None, None, None


def vocab_parallel_target_logprobs(
    rows: torch.Tensor,  # [N, h], identical on every TP rank
    weight: torch.Tensor,  # [V_pad/tp, h] this rank's vocab shard
    targets: torch.Tensor,  # [N] int64 global token ids in [0, vocab_size)
    *,
    vocab_size: int,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_targets: bool = True,
) -> torch.Tensor:
    """Target log-probs [N] (fp32, fp64 for fp64 inputs) over the true vocabulary.

    The rows' gradient is partial per vocab shard: wrap ``rows`` in a TP mapping whose backward
    sums over TP (see :func:`segment_logprob_sums`) when tp > 1. ``check_targets=False`` skips
    the id range check (two host syncs on a GPU) when the caller checked the ids on the host.
    """
    _, tp_size = _rank_size(tp_group)
    if rows.dim() != 2 or weight.dim() != 2 or rows.shape[1] != weight.shape[1]:
        raise ValueError(f"rows [N, h] and weight [V_local, h] must share h; got {tuple(rows.shape)} and {tuple(weight.shape)}")
    if targets.shape != rows.shape[:1]:
        raise ValueError(f"targets must have shape [{rows.shape[0]}], got {tuple(targets.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 (loss.logprob_chunk_size), got {chunk_size}")
    if not 0 < vocab_size <= weight.shape[0] * tp_size:
        raise ValueError(
            f"vocab_size {vocab_size} must be in (0, {weight.shape[0] * tp_size}] (padded vocabulary "
            f"= {weight.shape[0]} rows x tp {tp_size})"
        )
    if check_targets and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(
            f"target ids must lie in [0, {vocab_size}) at every position that has a segment; got "
            f"[{int(targets.min())}, {int(targets.max())}] (is model.vocab_size smaller than the tokenizer's?)"
        )
    return _VocabParallelTargetLogProb.apply(rows, weight, targets, vocab_size, tp_group, chunk_size)


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Forward: sum over the group. Backward: identity.

    Every rank of the group then computes the SAME loss L(y) from y = sum_r x_r and runs its own
    backward; rank r must receive dL/dx_r = dL/dy for its own partial x_r, which is the
    identity. (An all-reduce in backward would count every contribution cp times.) The parameter
    gradients of the ranks are then partial sums that DDP adds up over CP; see docs/loss.md.
    """

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Differentiable sum over ``group`` with identity backward (no-op for None / size 1)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSumIdentityBackward.apply(x, group)


def _tp_layout(hidden: torch.Tensor, tp_group, tp_size: int, sequence_parallel: bool) -> torch.Tensor:
    """[s_h, b, h] -> [s_local, b, h] replicated on TP, with a backward that sums over TP."""
    if tp_size == 1:
        return hidden
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=tp_group)
    return copy_to_tensor_model_parallel_region(hidden, group=tp_group)


@dataclass
class RowPlan:
    """Which positions need a log-prob, planned on the host (no device synchronisation)."""

    idx: torch.Tensor  # [N] int64 flat (position-major) indices of the needed positions
    targets: torch.Tensor  # [N] int64 target ids there
    sets: list[torch.Tensor]  # K x [N] int64: segment id in set k, or num_segments[k] if none


def plan_rows(target_ids: torch.Tensor, segment_ids: Sequence[torch.Tensor], num_segments: Sequence[int],
              vocab_size: int) -> RowPlan:
    """Check ids and select the needed positions; runs on the host tensors of the batch.

    Everything data-dependent (id range checks, ``nonzero``) happens here, where it costs no
    GPU synchronisation; the device phase only gathers and scatters with these indices.
    """
    for t in (target_ids, *segment_ids):
        if t.device.type != "cpu":
            raise ValueError(
                "plan_rows takes the host (CPU) target/segment ids: on a GPU every check here would "
                "synchronise the device; pass the PairBatch tensors before .to(device)"
            )
    if len(segment_ids) != len(num_segments):
        raise ValueError(f"{len(segment_ids)} segment sets but {len(num_segments)} segment counts")
    for k, (seg, n) in enumerate(zip(segment_ids, num_segments)):
        if seg.shape != target_ids.shape:
            raise ValueError(f"segment set {k} has shape {tuple(seg.shape)}, expected {tuple(target_ids.shape)}")
        if seg.numel() and int(seg.max()) >= n:
            raise ValueError(f"segment set {k} has id {int(seg.max())} >= its segment count {n}")
    # Position-major flattening, matching hidden.reshape(s*b, h).
    flat_sets = [seg.t().reshape(-1) for seg in segment_ids]  # K x [s*b]
    need = torch.zeros(target_ids.numel(), dtype=torch.bool)
    for seg in flat_sets:
        need |= seg >= 0
    idx = need.nonzero().squeeze(1)  # [N]
    targets = target_ids.t().reshape(-1).index_select(0, idx)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(
            f"target ids must lie in [0, {vocab_size}) at every position that has a segment; got "
            f"[{int(targets.min())}, {int(targets.max())}] (is model.vocab_size smaller than the tokenizer's?)"
        )
    sets = []
    for seg, n in zip(flat_sets, num_segments):
        sel = seg.index_select(0, idx)
        sets.append(torch.where(sel >= 0, sel, torch.full_like(sel, n)))  # id n = "not in this set", dropped
    return RowPlan(idx=idx, targets=targets, sets=sets)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without blocking the host (pinned + non_blocking on CUDA)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class SegmentSums:
    """Sums of target log-probs per segment and the number of tokens in each segment."""

    sums: torch.Tensor  # [n] float64, differentiable
    counts: torch.Tensor  # [n] float64 (exact integers)


def segment_logprob_sums(
    hidden: torch.Tensor,  # [s_local, b, h], or [s_local/tp, b, h] with sequence parallelism
    output_weight: torch.Tensor,  # [V_pad/tp, h] vocab-parallel output layer weight
    target_ids: torch.Tensor,  # [b, s_local] int64, on the host (CPU) for a sync-free GPU step
    segment_ids: Sequence[torch.Tensor],  # K tensors [b, s_local] int64: segment id or -1 (host)
    num_segments: Sequence[int],  # K segment counts: ids of set k lie in [0, num_segments[k])
    *,
    vocab_size: int,
    tp_group: Optional[dist.ProcessGroup] = None,
    cp_group: Optional[dist.ProcessGroup] = None,
    sequence_parallel: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[SegmentSums]:
    """For each segment set k: per-segment sums of log p(target) over positions with that id.

    Token log-probs are computed once at the union of positions any set needs. With ``cp_group``
    the results are the sums over the whole (un-split) sequences, identical on every CP rank.
    Ids are checked and the needed positions selected on the host (:func:`plan_rows`), so with
    host ids the device work has no host synchronisation; device ids are copied back once.
    """
    _, tp_size = _rank_size(tp_group)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [s, b, h], got shape {tuple(hidden.shape)}")
    if target_ids.dim() != 2:
        raise ValueError(f"target_ids must be [b, s_local], got shape {tuple(target_ids.shape)}")
    b, s = target_ids.shape
    sp = sequence_parallel and tp_size > 1
    expect_s = s // tp_size if sp else s
    if hidden.shape[:2] != (expect_s, b) or (sp and s % tp_size):
        raise ValueError(
            f"hidden shape {tuple(hidden.shape)} does not match target_ids [b={b}, s={s}]"
            + (f" with sequence parallelism (expected [{s}/{tp_size}, {b}, h])" if sp else f" (expected [{s}, {b}, h])")
        )
    if target_ids.device.type == "cpu":
        plan = plan_rows(target_ids, segment_ids, num_segments, vocab_size)
    else:  # device ids: same plan, with the host syncs of copying them back once
        plan = plan_rows(target_ids.cpu(), [seg.cpu() for seg in segment_ids], num_segments, vocab_size)
    dev = hidden.device
    idx = host_to_device(plan.idx, dev)
    targets = host_to_device(plan.targets, dev)

    hidden = _tp_layout(hidden, tp_group, tp_size, sp)  # [s, b, h]
    h = hidden.shape[-1]
    rows = hidden.reshape(s * b, h).index_select(0, idx)  # [N, h]
    # Also with N = 0 (nothing needed on this CP rank): the graph stays connected to hidden and
    # the weight (zero gradients), so the backward still runs through the model on this rank.
    logp = vocab_parallel_target_logprobs(
        rows, output_weight, targets, vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk_size,
        check_targets=False,
    )  # [N]
    logp64 = logp.to(torch.float64)  # [N]

    parts = []
    for sel_host, n in zip(plan.sets, num_segments):
        sel = host_to_device(sel_host, dev)
        sums = logp64.new_zeros(n + 1).index_add(0, sel, logp64)[:n]
        counts = torch.zeros(n + 1, dtype=torch.float64, device=dev).index_add_(
            0, sel, torch.ones_like(sel, dtype=torch.float64)
        )[:n]
        parts += [sums, counts]
    flat = all_reduce_sum(torch.cat(parts), cp_group)  # one collective for every set
    out, off = [], 0
    for n in num_segments:
        out.append(SegmentSums(sums=flat[off : off + n], counts=flat[off + n : off + 2 * n].detach()))
        off += 2 * n
    return out
