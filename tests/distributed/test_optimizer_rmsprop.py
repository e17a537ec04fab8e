"""optim.optimizer=rmsprop (the released LongPO recipe) through Megatron's optimizer path equals
torch.optim.RMSprop on the same model, step for step, and survives a checkpoint round trip."""

import pytest
import torch

from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, random_tokens, tiny_model_config

pytestmark = pytest.mark.distributed

STEPS = 5


def _loss(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    return model(tokens, pos, None, labels=tokens.roll(-1, 1)).mean()


def _rmsprop_vs_torch(wd):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_longpo.config import OptimConfig
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.training.optimizer import build_optimizer

    mcfg = tiny_model_config("llama", params_dtype="fp32")
    init_model_parallel(parallel_config())
    set_seed(0)
    model = build_model(mcfg, parallel_config())
    ref = build_model(mcfg, parallel_config())  # same weights, plain autograd + torch.optim.RMSprop
    ref.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False), module=model)
    optim = OptimConfig(optimizer="rmsprop", lr=3e-3, lr_warmup_fraction=0.0, lr_decay_style="constant",
                        weight_decay=wd, clip_grad=0.0, use_distributed_optimizer=False)
    opt, sched = build_optimizer([ddp], optim, mcfg, STEPS)
    # Megatron's default groups: no weight decay on biases and 1-D parameters (norms)
    decay = [p for n, p in ref.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in ref.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    torch_opt = torch.optim.RMSprop([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                                    lr=3e-3, alpha=0.99, eps=1e-8)
    init = [p.detach().clone() for p in ref.parameters()]
    max_diff = []
    for step in range(STEPS):
        tokens = random_tokens(2, 16, mcfg.vocab_size, step)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        _loss(ddp, tokens).backward()
        finalize_model_grads([ddp])
        opt.step()
        sched.step(1)
        torch_opt.zero_grad()
        _loss(ref, tokens).backward()
        torch_opt.step()
        max_diff.append(max(float((a - b).abs().max()) for a, b in zip(model.parameters(), ref.parameters())))
    moved = max(float((a - b).abs().max()) for a, b in zip(ref.parameters(), init))
    return max_diff, type(opt.optimizer).__name__, moved


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_rmsprop_matches_torch_over_five_steps(wd):
    diffs, inner, moved = run_distributed(_rmsprop_vs_torch, 1, args=(wd,))[0]
    assert inner == "RMSprop" and moved > 1e-3  # the weights did move
    assert len(diffs) == STEPS and max(diffs) < 1e-6, diffs


def test_rmsprop_needs_the_non_distributed_optimizer():
    from megatron_longpo.config import ConfigError, LongPOConfig, OptimConfig, validate

    cfg = LongPOConfig(optim=OptimConfig(optimizer="rmsprop", use_distributed_optimizer=True))
    with pytest.raises(ConfigError, match="optim.optimizer=rmsprop needs optim.use_distributed_optimizer: false"):
        validate(cfg)


def _rmsprop_run(run_dir, phase):
    """phase 'save': 2 steps, checkpoint after step 1; phase 'resume': load it, take step 2."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_longpo.config import OptimConfig
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.sharding import gather_full_state_dict
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.training.checkpointing import TrainState, load_checkpoint, save_training_checkpoint
    from megatron_longpo.training.optimizer import build_optimizer

    mcfg = tiny_model_config("qwen2")
    g = init_model_parallel(parallel_config())
    set_seed(0 if phase == "save" else 99)  # resume: everything must come from disk
    model = build_model(mcfg, parallel_config())
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False), module=model)
    opt, sched = build_optimizer([ddp], OptimConfig(optimizer="rmsprop", lr=1e-3, lr_warmup_fraction=0.5,
                                                    use_distributed_optimizer=False), mcfg, 4)

    def step(seed):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        _loss(ddp, random_tokens(2, 16, mcfg.vocab_size, seed)).backward()
        finalize_model_grads([ddp])
        opt.step()
        sched.step(1)

    if phase == "save":
        step(1)
        save_training_checkpoint(run_dir, TrainState(1, 2), model, opt, sched, {}, g, model_cfg=mcfg)
    else:
        load_checkpoint(run_dir, model, opt, sched, g, mcfg)
    step(2)
    return gather_full_state_dict(model, g.tp_group, mcfg.vocab_size)


def test_rmsprop_resume_is_exact(tmp_path):
    run = str(tmp_path / "run")
    after = run_distributed(_rmsprop_run, 1, args=(run, "save"))[0]
    resumed = run_distributed(_rmsprop_run, 1, args=(run, "resume"))[0]
    for k in after:  # step 2 after a resume needs RMSprop's square_avg from the checkpoint
        torch.testing.assert_close(resumed[k], after[k], rtol=0, atol=0)
