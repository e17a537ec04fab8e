"""Teacher-forced scoring of evaluation samples on a Megatron model under TP / CP / DP.

Per sample, through :func:`megatron_longpo.loss.forward.rank_segment_logprobs` (the training
forward: zigzag CP slice, hidden states, chunked vocab-parallel log-probs, never [S, V] logits):
- ``loglik``: sum over answer tokens of log p(token | prefix);
- ``matches``: answer positions whose token is the argmax over the full vocabulary;
- ``exact``: every answer position matches (teacher-forced exact match, what greedy decoding of
  the answer would produce once the answer prefix is given).

Batching: samples sorted by length (longest first) are cut into batches of at most
``tokens_per_batch`` padded tokens, one independent right-padded causal row per sample (exact
with every attention backend; see reference/compute.py). Batches are dealt round-robin over the
DP ranks (padded with filler forwards under expert parallelism, runtime/distributed.dp_share) and
the results summed over the DP group, so every rank returns every score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_longpo.config import DEFAULT_LOGPROB_CHUNK_SIZE
from megatron_longpo.data.layout import build_reference_batch
from megatron_longpo.evaluation.args import DEFAULT_TOKENS_PER_BATCH
from megatron_longpo.loss.forward import rank_segment_logprobs
from megatron_longpo.runtime.capabilities import collective_device
from megatron_longpo.runtime.distributed import ParallelGroups, dp_share



@dataclass(frozen=True)
class SampleScore:
    loglik: float  # sum of answer-token log-probs
    num_tokens: int  # answer tokens
    matches: int  # answer tokens that are the argmax
    exact: bool  # matches == num_tokens


def plan_batches(lengths: Sequence[int], tokens_per_batch: int, pad_multiple: int) -> list[list[int]]:
    """Sample indices per batch: longest first, at most ``tokens_per_batch`` padded tokens each."""
    if tokens_per_batch <= 0:
        raise ValueError(f"tokens_per_batch must be > 0 (got {tokens_per_batch})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    row = 0
    for i in order:
        if cur and (len(cur) + 1) * row > tokens_per_batch:
            batches.append(cur)
            cur = []
        if not cur:
            row = -(-lengths[i] // pad_multiple) * pad_multiple
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence[tuple[np.ndarray, np.ndarray]],  # (tokens [L], answer mask [L])
    groups: ParallelGroups,
    *,
    vocab_size: int,
    pad_id: int,
    pad_multiple: int,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
    sequence_parallel: bool = False,
    chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE,
    on_batch: Optional[Callable[[int], None]] = None,  # called with the tokens of each batch done here
) -> list[SampleScore]:
    """Scores of every sequence, identical on every rank. Collective over the default group's
    TP, CP and DP groups (every rank passes the same sequences). ``pad_multiple`` must be a
    multiple of ``config.seq_length_multiple(parallel)``."""
    for i, (t, m) in enumerate(sequences):
        if len(t) != len(m) or len(t) < 2 or not np.any(m[1:]):
            raise ValueError(f"evaluation sequence {i} needs >= 2 tokens and answer tokens after the first")
    plan = plan_batches([len(t) for t, _ in sequences], tokens_per_batch, pad_multiple)
    out = np.zeros((len(sequences), 3), dtype=np.float64)  # loglik, num_tokens, matches
    for k in dp_share(len(plan), groups):
        rows = plan[k] if k is not None else plan[-1][:1]  # None: a filler forward (EP lockstep), discarded
        batch = build_reference_batch([sequences[r] for r in rows], pad_multiple, pad_id)
        local = batch.for_cp_rank(groups.cp_rank, groups.cp_size)
        (res,) = rank_segment_logprobs(
            model, local.tokens, local.position_ids, None, local.target_ids, [local.response_segment], [len(rows)],
            groups, vocab_size=vocab_size, sequence_parallel=sequence_parallel, chunk_size=chunk_size, argmax=True,
        )
        if k is None:
            continue
        out[rows, 0] = res.sums.cpu().numpy()
        out[rows, 1] = res.counts.cpu().numpy()
        out[rows, 2] = res.argmax_matches.cpu().numpy()
        if on_batch is not None:
            on_batch(int(batch.lengths.sum()))
    if groups.dp_size > 1:
        t = torch.from_numpy(out).to(collective_device(groups.dp_group))
        dist.all_reduce(t, group=groups.dp_group)
        out = t.cpu().numpy()
    return [SampleScore(float(a), int(n), int(m), bool(m == n and n > 0)) for a, n, m in out]
