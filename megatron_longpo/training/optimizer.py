"""Megatron optimizer + OptimizerParamScheduler from the project's OptimConfig.

``rmsprop`` (the released LongPO recipe): Megatron-Core 0.16.1 builds only Adam and SGD, so the
optimizer is built through Megatron's own path as SGD (same param groups, wd/lr multipliers,
mixed-precision main params, grad clipping, checkpoint sharding) and its inner torch optimizer is
then replaced by ``torch.optim.RMSprop`` over the same param groups. Megatron's distributed
optimizer stores Adam moments only, so rmsprop needs ``optim.use_distributed_optimizer: false``
(config.validate says so).
"""

from __future__ import annotations

import math
from typing import List

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_longpo.config import ConfigError, ModelConfig, OptimConfig
from megatron_longpo.runtime import capabilities


def use_distributed_optimizer(optim: OptimConfig) -> bool:
    """``optim.use_distributed_optimizer`` on this machine (runtime/capabilities.py decides)."""
    return capabilities.use_distributed_optimizer(optim.use_distributed_optimizer, capabilities.cuda_available())


def megatron_optimizer_config(optim: OptimConfig, model: ModelConfig) -> OptimizerConfig:
    bf16 = model.params_dtype == "bf16"
    return OptimizerConfig(
        optimizer="sgd" if optim.optimizer == "rmsprop" else optim.optimizer,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer(optim),
    )


# Keys of an SGD param group that RMSprop must not inherit (it fills its own defaults).
_SGD_ONLY_KEYS = ("momentum", "dampening", "nesterov", "fused")


def _init_rmsprop_state(opt: torch.optim.Optimizer, config=None) -> None:
    """Empty RMSprop state as torch creates it on the first step (needed to load a checkpoint)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["step"] = torch.zeros((), dtype=torch.float32)
                opt.state[p]["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _use_rmsprop(optimizer, optim: OptimConfig) -> None:
    """Replace the inner torch optimizer of each Megatron wrapper by RMSprop over its param groups."""
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = wrapper.optimizer
        if inner is None:  # a rank without trainable parameters
            continue
        groups = [{k: v for k, v in g.items() if k not in _SGD_ONLY_KEYS} for g in inner.param_groups]
        wrapper.optimizer = torch.optim.RMSprop(
            groups, lr=optim.lr, alpha=optim.rmsprop_alpha, eps=optim.rmsprop_eps,
            weight_decay=optim.weight_decay, momentum=0.0, centered=False,
        )
        wrapper.init_state_fn = _init_rmsprop_state


def warmup_steps(optim: OptimConfig, train_iters: int) -> int:
    if optim.lr_warmup_steps is not None:
        return optim.lr_warmup_steps
    return int(math.ceil(optim.lr_warmup_fraction * train_iters))


def build_optimizer(ddp_models: List[torch.nn.Module], optim: OptimConfig, model: ModelConfig, train_iters: int):
    """Return (MegatronOptimizer, OptimizerParamScheduler) for DDP-wrapped model chunks.

    The schedule counts optimizer steps (one increment per step): warm-up over ``lr_warmup_steps``
    or ``ceil(lr_warmup_fraction * train_iters)`` steps from 0, then ``lr_decay_style`` down to
    ``min_lr`` at ``train_iters``. Weight decay is constant.
    """
    optimizer = get_megatron_optimizer(megatron_optimizer_config(optim, model), ddp_models)
    if optim.optimizer == "rmsprop":
        if optim.use_distributed_optimizer:
            raise ConfigError(
                "optim.optimizer=rmsprop needs optim.use_distributed_optimizer: false (Megatron-Core 0.16.1's "
                "distributed optimizer keeps Adam moments only)"
            )
        _use_rmsprop(optimizer, optim)
    wu = warmup_steps(optim, train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if wu > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=wu,
        lr_decay_steps=max(train_iters, wu + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(train_iters, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler
