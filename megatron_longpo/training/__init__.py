"""Training: per-micro-batch LongPO forward, Megatron-scheduled step, loop, optimizer, checkpoints."""

from megatron_longpo.training.step import (
    StepResult,
    average_metrics,
    forward_backward,
    microbatch_forward,
    train_step,
)

__all__ = ["StepResult", "average_metrics", "forward_backward", "microbatch_forward", "train_step"]
