"""The project's context-parallel core attention (drop-in for Megatron's DotProductAttention).

Data flow of one layer on CP rank r (s = S/cp local tokens in zigzag order, see runtime/zigzag.py):

1. K and V of the local tokens are concatenated on the head dim and all-gathered over the CP group
   (one collective); the backward of that gather is a reduce-scatter, so dK/dV computed by every
   rank's queries are summed onto the rank that owns each token.
2. The gathered [cp*s, ...] tensor is put back into global order (zigzag unslice): [S, b, 2g, d].
3. The local queries are cut into blocks (plan.py): each of the two zigzag chunks, split where the
   rejected branch starts. Each block attends, lower-right causally, to the concatenation of one
   or two contiguous global key ranges, so kernels never need a dense mask on CUDA.

Masking is by GLOBAL position, GQA is handled by the kernels (K/V keep g heads), TP arrives
already split by Megatron (h/tp query heads, g/tp groups).

How the layout reaches this module: ``attention_mask`` is either None (plain causal rows, as for
``two_sequences``) or a *branch layout*: an int64 CPU tensor [b, 2] holding, per row, the global
(prefix_end, rejected_start) of a shared-prefix row. It is a tensor so it passes unchanged through
GPTModel -> TransformerBlock -> TransformerLayer -> SelfAttention and is saved and replayed by
Megatron's activation recomputation like any other checkpoint argument; it lives on the CPU so
reading it costs no device synchronisation. The data side builds it
(``PairLayout.attention_mask()`` via ``PairBatch.for_cp_rank``, data/batch.py); models never see a
PairBatch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_longpo.models.attention.kernels import KERNELS
from megatron_longpo.models.attention.plan import plan_blocks
from megatron_longpo.runtime.zigzag import zigzag_unslice

RowLayout = Optional[tuple[int, int]]  # (prefix_end, rejected_start) or None for a causal row


# ----------------------------------------------------------------------------------------------
# Branch layout tensor <-> per-row python tuples
# ----------------------------------------------------------------------------------------------


def branch_layout_tensor(prefix_end: Sequence[int], rejected_start: Sequence[int]) -> torch.Tensor:
    """The ``attention_mask`` the project attention understands: int64 CPU [b, 2]."""
    return torch.tensor([list(prefix_end), list(rejected_start)], dtype=torch.int64).t().contiguous()


def row_layouts(attention_mask: Optional[torch.Tensor], batch: int) -> list[RowLayout]:
    """Per-row layouts from ``attention_mask`` (None -> every row causal)."""
    if attention_mask is None:
        return [None] * batch
    if (
        not isinstance(attention_mask, torch.Tensor)
        or attention_mask.dtype != torch.int64
        or attention_mask.shape != (batch, 2)
    ):
        desc = (
            f"{attention_mask.dtype} tensor of shape {tuple(attention_mask.shape)}"
            if isinstance(attention_mask, torch.Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(
            "the project context-parallel attention takes attention_mask=None (causal) or a branch "
            f"layout (int64 [batch={batch}, 2]: prefix_end, rejected_start), got a {desc}; build "
            "the model inputs with PairBatch.for_cp_rank (megatron_longpo/data/batch.py)"
        )
    return [(int(p), int(r)) for p, r in attention_mask.tolist()]


# ----------------------------------------------------------------------------------------------
# CP collectives
# ----------------------------------------------------------------------------------------------


# torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor for all_gather_single /
# reduce_scatter_single (same arguments); older torch (the GPU images: 2.11) has only the former.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over ``group``; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # [s, ...] -> [cp*s, ...]
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # [cp*s, ...] -> [s, ...]
        size = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // size,) + tuple(grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None


class _AsyncAllGatherSeq(torch.autograd.Function):
    """:class:`_AllGatherSeq` launched asynchronously: the output is valid only after the handle
    appended to ``pending`` is waited on (the caller does, before reading it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, pending: list) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))
        pending.append(_all_gather(out, x.contiguous(), group=group, async_op=True))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllGatherSeq.backward(ctx, grad)[0], None, None


def gather_chunks_overlapped(chunks: Sequence[torch.Tensor], cp_group: dist.ProcessGroup):
    """Yield each [S/cp, ...] chunk gathered into global order [S, ...], with the gather of chunk
    i+1 in flight while the caller computes on chunk i (differentiable)."""
    cp = dist.get_world_size(cp_group)
    pending: list = []
    gathered = [_AsyncAllGatherSeq.apply(chunks[0], cp_group, pending)]
    for i in range(len(chunks)):
        if i + 1 < len(chunks):
            gathered.append(_AsyncAllGatherSeq.apply(chunks[i + 1], cp_group, pending))
        pending[i].wait()
        yield zigzag_unslice(list(gathered[i].chunk(cp, dim=0)), dim=0)


def gather_global_sequence(x_local: torch.Tensor, cp_group: dist.ProcessGroup) -> torch.Tensor:
    """[S/cp, ...] zigzag-local -> [S, ...] in global order (differentiable)."""
    cp = dist.get_world_size(cp_group)
    if cp == 1:
        return x_local
    gathered = _AllGatherSeq.apply(x_local, cp_group)
    return zigzag_unslice(list(gathered.chunk(cp, dim=0)), dim=0)


# ----------------------------------------------------------------------------------------------
# Local attention given global K/V (pure: no process groups)
# ----------------------------------------------------------------------------------------------


def attend_local(
    q: torch.Tensor,  # [b, h, s_local, d] local queries (zigzag order)
    k: torch.Tensor,  # [b, g, S, d] global keys
    v: torch.Tensor,  # [b, g, S, d]
    layouts: Sequence[RowLayout],
    cp_rank: int,
    cp_size: int,
    *,
    scale: float,
    kernel: str = "sdpa",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention output [b, h, s_local, d] of this rank's queries under the branch rule."""
    fn = KERNELS[kernel]
    seq_len = k.shape[2]
    if q.shape[2] * cp_size != seq_len:
        raise ValueError(f"local queries ({q.shape[2]}) x cp ({cp_size}) != global keys ({seq_len})")
    groups: dict[RowLayout, list[int]] = {}
    for i, lay in enumerate(layouts):
        groups.setdefault(lay, []).append(i)
    outs, order = [], []
    for lay, rows in groups.items():
        if len(rows) == q.shape[0]:
            qg, kg, vg = q, k, v
        else:
            idx = torch.tensor(rows, device=q.device)
            qg, kg, vg = q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx)
        parts = []
        for blk in plan_blocks(seq_len, cp_rank, cp_size, *(lay or (None, None))):
            qb = qg[:, :, blk.q_start : blk.q_end]
            if len(blk.kv_ranges) == 1:
                (s, e), = blk.kv_ranges
                kb, vb = kg[:, :, s:e], vg[:, :, s:e]
            else:
                kb = torch.cat([kg[:, :, s:e] for s, e in blk.kv_ranges], dim=2)
                vb = torch.cat([vg[:, :, s:e] for s, e in blk.kv_ranges], dim=2)
            parts.append(fn(qb, kb, vb, scale, dropout_p))
        outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
        order.extend(rows)
    if len(outs) == 1:
        return outs[0]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(outs, dim=0).index_select(0, inverse.to(q.device))


# ----------------------------------------------------------------------------------------------
# The Megatron core-attention module
# ----------------------------------------------------------------------------------------------


class ContextParallelAttention(MegatronModule):
    """Core attention with all-gathered K/V over CP, zigzag queries and shared-prefix branches.

    Same constructor and forward signature as Megatron's ``DotProductAttention``:
    query [s, b, h/tp, d], key/value [s, b, g/tp, d] -> context [s, b, h/tp * d], s = S/cp.
    Subclasses pick the kernel (``kernel`` class attribute).
    """

    kernel = "sdpa"
    # parallel.cp_kv_gather_chunks: K/V gathered in this many KV-head chunks, each chunk's gather
    # overlapping the previous chunk's attention (heads are independent, so the result is the same)
    kv_gather_chunks = 1

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"{type(self).__name__} is causal-only, got attn_mask_type={attn_mask_type}")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"{type(self).__name__} supports softmax_type='vanilla' only")
        if getattr(config, "window_size", None) is not None:
            raise ValueError(f"{type(self).__name__} does not support sliding-window attention")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.cp_group = pg_collection.cp
        self.layer_number = max(1, layer_number)
        self.attention_type = attention_type
        tp = pg_collection.tp.size()
        self.head_dim = config.kv_channels
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        # apply_query_key_layer_scaling only changes where DotProductAttention rounds (it divides
        # the scale by the layer number and multiplies back in fp32): the math is this scale.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,  # [s, b, h, d]
        key: torch.Tensor,  # [s, b, g, d]
        value: torch.Tensor,  # [s, b, g, d]
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed sequences (THD) are not supported by the project CP attention")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the project CP attention")
        s, b, h, d = query.shape
        layouts = row_layouts(attention_mask, b)
        cp = self.cp_group.size()
        cp_rank = self.cp_group.rank()
        g = key.shape[2]
        if cp > 1 and self.kv_gather_chunks > 1:
            return self._forward_overlapped(query, key, value, layouts, cp, cp_rank)
        if cp > 1:
            # One all-gather for K and V together: [s, b, 2g, d] -> [S, b, 2g, d] (global order).
            kv = gather_global_sequence(torch.cat([key, value], dim=2), self.cp_group)
            k_glob, v_glob = kv[:, :, :g], kv[:, :, g:]
        else:
            k_glob, v_glob = key, value
        out = attend_local(
            query.permute(1, 2, 0, 3),  # [b, h, s, d]
            k_glob.permute(1, 2, 0, 3),  # [b, g, S, d]
            v_glob.permute(1, 2, 0, 3),
            layouts,
            cp_rank,
            cp,
            scale=self.softmax_scale,
            kernel=self.kernel,
            dropout_p=self.dropout_p if self.training else 0.0,
        )  # [b, h, s, d]
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _forward_overlapped(self, query, key, value, layouts, cp: int, cp_rank: int) -> torch.Tensor:
        """K/V gathered per chunk of KV heads; chunk i+1's gather runs during chunk i's attention."""
        s, b, h, d = query.shape
        g = key.shape[2]
        n = self.kv_gather_chunks
        if g % n:
            raise ValueError(f"parallel.cp_kv_gather_chunks={n} must divide the KV heads per TP rank ({g})")
        gc, rep = g // n, h // g
        chunks = [torch.cat([key[:, :, i * gc:(i + 1) * gc], value[:, :, i * gc:(i + 1) * gc]], dim=2) for i in range(n)]
        outs = []
        for i, kv in enumerate(gather_chunks_overlapped(chunks, self.cp_group)):  # [S, b, 2gc, d]
            outs.append(attend_local(
                query[:, :, i * gc * rep:(i + 1) * gc * rep].permute(1, 2, 0, 3),  # this chunk's query heads
                kv[:, :, :gc].permute(1, 2, 0, 3), kv[:, :, gc:].permute(1, 2, 0, 3),
                layouts, cp_rank, cp, scale=self.softmax_scale, kernel=self.kernel,
                dropout_p=self.dropout_p if self.training else 0.0,
            ))  # [b, h/n, s, d]
        return torch.cat(outs, dim=1).permute(2, 0, 1, 3).reshape(s, b, h * d)


class FlashContextParallelAttention(ContextParallelAttention):
    """The same attention computed with flash-attn 2 kernels (CUDA, flash-attn installed)."""

    kernel = "flash"


class CudnnContextParallelAttention(ContextParallelAttention):
    """The same attention computed by TE DotProductAttention (cuDNN fused attention on H100)."""

    kernel = "cudnn"


class FA3ContextParallelAttention(ContextParallelAttention):
    """The same attention computed with FlashAttention-3 kernels (Hopper)."""

    kernel = "fa3"
