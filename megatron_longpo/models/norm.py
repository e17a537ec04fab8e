"""RMSNorm that works with Megatron sequence parallelism on any device.

Megatron-Core's torch-norm wrapper refuses ``sequence_parallel`` unless apex or TE provides the
norm. The math of an RMSNorm does not care how the sequence is split; what SP needs is that the
weight gradient, computed from a sequence shard on each TP rank, is summed over the TP group.
Megatron's ``finalize_model_grads`` does exactly that for parameters tagged
``sequence_parallel=True``, so this module only has to tag its weight.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (HF Llama/Mistral/Qwen2/Qwen3 semantics)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, h] -> [s, b, h]
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
