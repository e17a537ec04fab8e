"""Model FLOPs of a LongPO step (docs/training.md has the derivation).

Counted per layer for a decoder with hidden h, query width q = heads*d, key/value width
k = groups*d, SwiGLU width f, on n tokens that attend to A (query, key) pairs in total:
    QKV projection   2*n*h*(q + 2k)
    attention        4*A*q            (QK^T and AV, each 2*A*q; A = n(n+1)/2 for a causal row)
    output proj      2*n*q*h
    MLP (SwiGLU)     6*n*h*f          (gate, up, down)
plus the output layer only at the positions whose log-probs are needed: 2*m*h*V.
Training = 3x forward (backward is 2x). Activation recomputation is NOT counted (model FLOPs,
as MFU is usually reported).
"""

from __future__ import annotations

from typing import Union

import torch

from megatron_longpo.config import ModelConfig
from megatron_longpo.data.pair_layout import PairLayout
from megatron_longpo.models.attention.plan import attended_pairs as row_attended_pairs


def attended_pairs(layout: Union[PairLayout, torch.Tensor]) -> int:
    """(query, key) pairs computed for one micro-batch (padding not counted), from its
    :class:`PairLayout` or its ``PairBatch.branch_ids`` [rows, S]. The rule is the attention's
    (models/attention/plan.py)."""
    if isinstance(layout, torch.Tensor):
        layout = PairLayout.from_branch_ids("shared_prefix", layout.cpu().numpy())  # any 0 | 1 | 2 | -1 runs
    return sum(row_attended_pairs(p, r, e) for p, r, e in layout.bounds.tolist())


def forward_flops(model: ModelConfig, n_tokens: int, n_attended: int, n_logit_positions: int) -> float:
    h, f = model.hidden_size, model.ffn_hidden_size
    q = model.num_attention_heads * model.head_dim
    k = model.num_query_groups * model.head_dim
    # MoE: active parameters only (k experts of moe ffn per token) plus the router's [h, E] GEMM.
    mlp = 6 * n_tokens * h * f
    if model.num_experts:
        mlp = 6 * n_tokens * h * model.expert_ffn_hidden_size * model.moe_router_topk + 2 * n_tokens * h * model.num_experts
    per_layer = 2 * n_tokens * h * (q + 2 * k) + 4 * n_attended * q + 2 * n_tokens * q * h + mlp
    return float(model.num_layers * per_layer + 2 * n_logit_positions * h * model.vocab_size)


def train_flops(model: ModelConfig, n_tokens: int, n_attended: int, n_logit_positions: int) -> float:
    return 3.0 * forward_flops(model, n_tokens, n_attended, n_logit_positions)
