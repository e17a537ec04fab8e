"""Reference log-prob sums of independent sequences: the one code path of precompute and online.

Work items. A cache holds values[N, T, 2] (sample, turn, side 0 = chosen / 1 = rejected); item id
``(i * T + t) * 2 + side`` is the flat index of one value, and one item is one sequence:
- mode ``longpo``: turn t of sample i without history, [short_context_t ; I_t ; y_t]
  (``PreferenceSample.references``), T = the largest number of turns;
- mode ``dpo``: the long policy sequence S_w / S_l with every turn and its full history; the sum
  covers all response tokens, T = 1.

Batching. Items are sorted by length (longest first, ties by id) and cut greedily into batches of
at most ``tokens_per_batch`` padded tokens (rows x padded length of the batch's longest item; an
item longer than the budget gets a batch of its own). Each batch is ONE forward with one
independent causal sequence per row, right-padded: under causal attention no real position sees
padding, and position ids restart at 0 on every row, so each row's values are those of the
sequence alone. This is exact with every attention backend (TE, SDPA, flash, local), unlike
concatenating sequences into one row, which would need a block-diagonal mask or THD packing.
The plan depends only on the item lengths and the budget, never on the number of ranks, so every
DP layout and a resumed run compute identical batches.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_longpo.config import DEFAULT_LOGPROB_CHUNK_SIZE
from megatron_longpo.data.indexed import FIXED_SEQUENCES, SEQUENCES_PER_TURN
from megatron_longpo.data.layout import build_reference_batch
from megatron_longpo.loss.forward import rank_segment_logprobs
from megatron_longpo.reference.precompute_args import (  # noqa: F401  (defined with the torch-free CLI)
    DEFAULT_PAD_MULTIPLE,
    DEFAULT_TOKENS_PER_BATCH,
    MODES,
)
from megatron_longpo.runtime.distributed import ParallelGroups, group_max


def num_turn_slots(dataset, mode: str) -> int:
    """T of the values array: the most reference turns of any sample (longpo) or 1 (dpo)."""
    if mode == "dpo":
        return 1
    if mode != "longpo":
        raise ValueError(f"reference mode {mode!r} is not one of {list(MODES)}")
    return max(1, int(np.max(dataset.num_turns)))


def item_lengths(dataset, mode: str, turns: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int64, lengths [n] int64) of every item of ``dataset`` (no sample is read)."""
    n = len(dataset)
    idx = np.arange(n, dtype=np.int64)
    if mode == "dpo":
        ids = np.stack([idx * 2, idx * 2 + 1], axis=1).reshape(-1)
        lengths = np.stack(
            [dataset.prefix_lengths + dataset.chosen_branch_lengths, dataset.prefix_lengths + dataset.rejected_branch_lengths],
            axis=1,
        ).reshape(-1)
        return ids, lengths.astype(np.int64)
    docs = np.asarray(dataset.indexed.document_indices, dtype=np.int64)
    seq_lens = np.asarray(dataset.indexed.sequence_lengths, dtype=np.int64)
    first = docs[:-1]
    ids, lengths = [], []
    for t in range(turns):
        sel = idx[dataset.num_turns > t]
        for side in (0, 1):
            ids.append((sel * turns + t) * 2 + side)
            lengths.append(seq_lens[first[sel] + FIXED_SEQUENCES + SEQUENCES_PER_TURN * t + 2 * side])
    ids_a, len_a = np.concatenate(ids), np.concatenate(lengths)
    order = np.argsort(ids_a, kind="stable")
    return ids_a[order], len_a[order]


def padded_length(length: int, multiple: int) -> int:
    return max(multiple, -(-int(length) // multiple) * multiple)


def plan_batches(ids: np.ndarray, lengths: np.ndarray, tokens_per_batch: int, pad_multiple: int) -> list[np.ndarray]:
    """Item ids per batch (see module doc); deterministic in (ids, lengths, budget, multiple)."""
    if tokens_per_batch <= 0:
        raise ValueError(f"tokens_per_batch must be > 0 (got {tokens_per_batch})")
    order = np.lexsort((ids, -lengths))  # longest first, then by id
    batches: list[np.ndarray] = []
    cur: list[int] = []
    row_len = 0
    for j in order:
        if cur and (len(cur) + 1) * row_len > tokens_per_batch:
            batches.append(ids[cur])
            cur = []
        if not cur:
            row_len = padded_length(lengths[j], pad_multiple)
        cur.append(int(j))
    if cur:
        batches.append(ids[cur])
    return batches


def split_id(item: int, turns: int) -> tuple[int, int, int]:
    """(sample, turn, side) of an item id."""
    side = item % 2
    slot = item // 2
    return slot // turns, slot % turns, side


def item_sequences(dataset, items: Sequence[int], mode: str, turns: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens [L], response mask [L]) of each item, in order."""
    samples: dict[int, object] = {}
    out = []
    for item in items:
        i, t, side = split_id(int(item), turns)
        s = samples.get(i)
        if s is None:
            s = samples[i] = dataset[i]
        if mode == "dpo":
            out.append(s.long_sequences()[side])
        else:
            ref = s.references[t]
            out.append((ref.chosen, ref.chosen_mask) if side == 0 else (ref.rejected, ref.rejected_mask))
    return out


@torch.no_grad()
def sequence_logprob_sums(
    model: torch.nn.Module,
    sequences: Sequence[tuple[np.ndarray, np.ndarray]],
    groups: ParallelGroups,
    *,
    vocab_size: int,
    pad_id: int,
    pad_to_multiple: int,
    sequence_parallel: bool = False,
    chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """(sums [n] float64, response-token counts [n] int64) of n sequences in ONE forward.

    Collective over the TP and CP groups (every rank of them passes the same sequences).
    ``pad_to_multiple`` must be a multiple of ``config.seq_length_multiple`` of the model's layout.
    """
    local = build_reference_batch(sequences, pad_to_multiple, pad_id).for_cp_rank(groups.cp_rank, groups.cp_size)
    (res,) = rank_segment_logprobs(
        model, local.tokens, local.position_ids, None, local.target_ids, [local.response_segment], [len(sequences)],
        groups, vocab_size=vocab_size, sequence_parallel=sequence_parallel, chunk_size=chunk_size,
    )
    return res.sums.cpu().numpy().astype(np.float64), res.counts.cpu().numpy().astype(np.int64)


def sum_turns(values: np.ndarray) -> np.ndarray:
    """[B, T, 2] per-turn values (NaN = no such turn) -> [B, 2] float64 sums over turns.

    Turns are added in order 0..T-1, so the cache and the online source produce the same bits
    from the same per-turn values.
    """
    out = np.zeros((values.shape[0], 2), dtype=np.float64)
    for t in range(values.shape[1]):
        v = values[:, t, :]
        out += np.where(np.isnan(v), 0.0, v)
    return out


def compute_items(
    model: torch.nn.Module,
    dataset,
    items: Sequence[int],
    mode: str,
    turns: int,
    groups: ParallelGroups,
    *,
    vocab_size: int,
    tokens_per_batch: int,
    pad_to_multiple: int,
    sequence_parallel: bool = False,
    chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """(values [n] float64, counts [n] int64) of ``items``, batched by :func:`plan_batches`.

    Collective over the TP and CP groups and, with expert parallelism, the EP group: its ranks
    (other DP ranks, other items) meet in every MoE layer, so each runs as many forwards as the
    one with the most batches (filler forwards of one short item, discarded)."""
    seqs = item_sequences(dataset, items, mode, turns)
    lengths = np.array([len(t) for t, _ in seqs], dtype=np.int64)
    sums = np.empty(len(seqs), dtype=np.float64)
    counts = np.empty(len(seqs), dtype=np.int64)
    plan: list = plan_batches(np.arange(len(seqs), dtype=np.int64), lengths, tokens_per_batch, pad_to_multiple)
    if groups.ep_size > 1:
        plan += [None] * (group_max(len(plan), groups.ep_group) - len(plan))
    filler = [int(np.argmin(lengths))] if len(seqs) else []
    for rows in plan:
        s, c = sequence_logprob_sums(
            model, [seqs[r] for r in (rows if rows is not None else filler)], groups, vocab_size=vocab_size,
            pad_id=dataset.pad_id, pad_to_multiple=pad_to_multiple, sequence_parallel=sequence_parallel,
            chunk_size=chunk_size,
        )
        if rows is not None:
            sums[rows], counts[rows] = s, c
    return sums, counts
