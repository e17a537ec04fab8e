"""Training checkpoints: exact round trip of model + optimizer + scheduler, weights into another TP;
a MoE run's full state saved at EP=2 resumes at EP=1 and the other way round."""

import contextlib
import json

import pytest
import torch

from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, random_tokens, tiny_model_config

pytestmark = pytest.mark.distributed


def _setup(tp, seed=0):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_longpo.config import OptimConfig
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.training.optimizer import build_optimizer

    mcfg = tiny_model_config("qwen2")
    g = init_model_parallel(parallel_config(tp=tp))
    set_seed(seed)
    model = build_model(mcfg, parallel_config(tp=tp))
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False), module=model)
    opt, sched = build_optimizer([ddp], OptimConfig(lr=1e-3, lr_warmup_fraction=0.5, clip_grad=1.0), mcfg, 4)
    return mcfg, g, model, ddp, opt, sched


def _step(mcfg, ddp, opt, sched, seed):
    from megatron.core.distributed import finalize_model_grads

    tokens = random_tokens(2, 16, mcfg.vocab_size, seed)
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ddp(tokens, pos, None, labels=tokens.roll(-1, 1)).mean().backward()
    finalize_model_grads([ddp])
    ok, gnorm, _ = opt.step()
    sched.step(1)
    return gnorm


def _save_then_continue(run_dir, tp):
    from megatron_longpo.models.sharding import gather_full_state_dict
    from megatron_longpo.training.checkpointing import TrainState, save_training_checkpoint

    mcfg, g, model, ddp, opt, sched = _setup(tp)
    _step(mcfg, ddp, opt, sched, 1)
    save_training_checkpoint(run_dir, TrainState(1, 2), model, opt, sched, {"note": "test"}, g, model_cfg=mcfg)
    saved = gather_full_state_dict(model, g.tp_group, mcfg.vocab_size)
    _step(mcfg, ddp, opt, sched, 2)  # the step after the checkpoint, uninterrupted
    return saved, gather_full_state_dict(model, g.tp_group, mcfg.vocab_size), sched.get_lr(opt.param_groups[0])


def _resume_and_continue(run_dir, tp):
    from megatron_longpo.models.sharding import gather_full_state_dict
    from megatron_longpo.training.checkpointing import load_checkpoint

    mcfg, g, model, ddp, opt, sched = _setup(tp, seed=99)  # different init: everything must come from disk
    st = load_checkpoint(run_dir, model, opt, sched, g, mcfg)
    loaded = gather_full_state_dict(model, g.tp_group, mcfg.vocab_size)
    _step(mcfg, ddp, opt, sched, 2)
    return st.iteration, st.consumed_samples, loaded, gather_full_state_dict(model, g.tp_group, mcfg.vocab_size), \
        sched.get_lr(opt.param_groups[0])


def _weights_only(run_dir, tp):
    from megatron_longpo.models.sharding import gather_full_state_dict
    from megatron_longpo.training.checkpointing import load_checkpoint

    mcfg, g, model, ddp, opt, sched = _setup(tp, seed=7)
    st = load_checkpoint(run_dir, model, opt, sched, g, mcfg, finetune=True)
    return st.iteration, gather_full_state_dict(model, g.tp_group, mcfg.vocab_size)


def _resume_other_layout(run_dir, tp):
    from megatron_longpo.training.checkpointing import load_checkpoint

    mcfg, g, model, ddp, opt, sched = _setup(tp)
    load_checkpoint(run_dir, model, opt, sched, g, mcfg)


def test_resume_is_exact_and_weights_reshard(tmp_path):
    run = str(tmp_path / "run")
    saved, after, lr = run_distributed(_save_then_continue, 2, args=(run, 2))[0]
    it, consumed, loaded, resumed_after, lr2 = run_distributed(_resume_and_continue, 2, args=(run, 2))[0]
    assert (it, consumed) == (1, 2)
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k], rtol=0, atol=0)
        # Same step after resume == uninterrupted: needs the Adam moments and the LR schedule.
        torch.testing.assert_close(resumed_after[k], after[k], rtol=0, atol=0)
    assert lr2 == lr
    # Weights only into TP=1.
    it1, w1 = run_distributed(_weights_only, 1, args=(run, 1))[0]
    assert it1 == 0
    for k in saved:
        torch.testing.assert_close(w1[k], saved[k], rtol=0, atol=0)
    # Full resume into another layout is refused with the fix in the message.
    with pytest.raises(AssertionError, match="finetune=true"):
        run_distributed(_resume_other_layout, 1, args=(run, 1))


@contextlib.contextmanager
def _cuda_type_names():
    """Megatron's bf16 optimizer wrapper accepts only ``torch.cuda.*Tensor`` parameters (one type
    check in its constructor): CPU tensors report those names while it is built."""
    real = torch.Tensor.type

    def named(t, *args, **kw):
        name = real(t, *args, **kw)
        return name if args or kw or name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = named
    try:
        yield
    finally:
        torch.Tensor.type = real


def _moe_setup(ep, optimizer, seed, dtype="fp32"):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_longpo.config import OptimConfig
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.training.optimizer import build_optimizer

    mcfg = tiny_model_config("mixtral", moe_aux_loss_coeff=0.01, params_dtype=dtype)
    g = init_model_parallel(parallel_config(ep=ep))
    set_seed(seed)
    model = build_model(mcfg, parallel_config(ep=ep))
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False), module=model)
    with _cuda_type_names():
        opt, sched = build_optimizer([ddp], OptimConfig(optimizer=optimizer, lr=1e-2, lr_warmup_fraction=0.5,
                                                             use_distributed_optimizer=False), mcfg, 4)
    return mcfg, g, model, ddp, opt, sched


def _moe_step(mcfg, g, ddp, opt, sched, seed):
    """One optimizer step on this DP rank's two sequences; the global batch is the same at any EP."""
    from megatron.core.distributed import finalize_model_grads

    tokens = random_tokens(2, 16, mcfg.vocab_size, 10 * seed + g.dp_rank)
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = ddp(tokens, pos, None, labels=tokens.roll(-1, 1)).mean()
    loss.backward()
    finalize_model_grads([ddp])
    opt.step()
    sched.step(1)
    out = torch.tensor([float(loss)])
    torch.distributed.all_reduce(out)
    return float(out) / torch.distributed.get_world_size()


def _moe_state(model, opt, g) -> dict:
    """Full-layout (all experts) weights and optimizer state: {"param" | state name: {name: tensor}}."""
    from megatron_longpo.models.sharding import ExpertShards, gather_full_state_dict
    from megatron_longpo.training.optimizer_state import param_states

    params = {id(ps.model): ps for ps in param_states(opt)}
    states = {i: ps.state for i, ps in params.items()}
    names = [k for k, v in next(iter(states.values())).items() if k != "step"]
    out = {k: gather_full_state_dict(model, g.tp_group, experts=ExpertShards.of(g), of=lambda p, k=k: states[id(p)][k])
           for k in names}
    out["param"] = gather_full_state_dict(model, g.tp_group, experts=ExpertShards.of(g))
    if model.config.bf16:  # the fp32 main weights the optimizer updates
        out["main"] = gather_full_state_dict(model, g.tp_group, experts=ExpertShards.of(g), of=lambda p: params[id(p)].main)
    out["step"] = {"every parameter": torch.stack([s["step"] for s in states.values()]).unique()}
    return out


def _moe_save_then_continue(run_dir, ep, optimizer, dtype):
    from megatron_longpo.training.checkpointing import TrainState, save_training_checkpoint

    mcfg, g, model, ddp, opt, sched = _moe_setup(ep, optimizer, 0, dtype)
    _moe_step(mcfg, g, ddp, opt, sched, 1)
    save_training_checkpoint(run_dir, TrainState(1, 4), model, opt, sched, {}, g, model_cfg=mcfg)
    saved = _moe_state(model, opt, g)
    loss = _moe_step(mcfg, g, ddp, opt, sched, 2)  # the uninterrupted run's next step
    return saved, loss, _moe_state(model, opt, g)


def _moe_resume_and_continue(run_dir, ep, optimizer, dtype):
    from megatron_longpo.training.checkpointing import load_checkpoint

    mcfg, g, model, ddp, opt, sched = _moe_setup(ep, optimizer, 99, dtype)  # everything must come from disk
    st = load_checkpoint(run_dir, model, opt, sched, g, mcfg, own_checkpoint=True)
    loaded = _moe_state(model, opt, g)
    loss = _moe_step(mcfg, g, ddp, opt, sched, 2)
    return st.iteration, loaded, loss, _moe_state(model, opt, g)


@pytest.mark.parametrize("optimizer,saved_ep,resumed_ep,dtype",
                         [("adam", 2, 1, "fp32"), ("rmsprop", 1, 2, "fp32"), ("rmsprop", 2, 1, "bf16")])
def test_moe_full_resume_across_ep_sizes(tmp_path, optimizer, saved_ep, resumed_ep, dtype):
    """Model + optimizer + scheduler saved at one EP size load at another into exactly the saved
    values (every expert's moments, the step, a bf16 run's fp32 main weights, tensor by tensor),
    the next step's loss equals the uninterrupted run's and so does the state after it (same
    global batch; another EP size sums the same terms in another order)."""
    run = str(tmp_path / "run")
    saved, loss, after = run_distributed(_moe_save_then_continue, 2, args=(run, saved_ep, optimizer, dtype))[0]
    it, loaded, loss2, after2 = run_distributed(_moe_resume_and_continue, 2, args=(run, resumed_ep, optimizer, dtype))[0]
    assert it == 1
    moments = {"adam": ["exp_avg", "exp_avg_sq"], "rmsprop": ["square_avg"]}[optimizer]
    assert sorted(saved) == sorted(moments + ["param", "step"] + (["main"] if dtype == "bf16" else []))
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight" in saved[moments[0]]
    for kind in saved:
        assert saved[kind].keys() == loaded[kind].keys()
        for k in saved[kind]:
            torch.testing.assert_close(loaded[kind][k], saved[kind][k], rtol=0, atol=0, msg=lambda m: f"{kind} {k}: {m}")
    assert abs(loss2 - loss) <= 1e-6 * abs(loss)
    for kind in after:
        for k, want in after[kind].items():  # to 1e-5 of each tensor's scale
            if dtype == "bf16" and ".experts." in k:
                continue  # bf16 expert GEMMs over another token grouping round differently: not comparable
            err = float((after2[kind][k].float() - want.float()).abs().max())
            assert err <= 1e-5 * float(want.abs().max()), (kind, k, err, float(want.abs().max()))


def test_megatron_format_refuses_an_ep_change_by_name(tmp_path):
    """A checkpoint in Megatron-Core's own optimizer format (the distributed optimizer's, and the
    plain optimizer's before 'per_parameter') cannot change EP: refused before a tensor is read."""
    run = tmp_path / "run"
    run_distributed(_moe_save_then_continue, 2, args=(str(run), 2, "adam", "fp32"))
    meta_path = run / "iter_0000001" / "longpo_meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["train_state"]["optimizer_sharding"] == "per_parameter"
    meta["train_state"]["optimizer_sharding"] = "dp_reshardable"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AssertionError, match=r"same cp/dp/ep and world size \(tp and pp may change\)"):
        run_distributed(_moe_resume_and_continue, 2, args=(str(run), 1, "adam", "fp32"))


def test_incomplete_checkpoint_is_not_resumed(tmp_path):
    from megatron_longpo.training.checkpointing import CheckpointError, find_checkpoint

    run = tmp_path / "run"
    (run / "iter_0000005.tmp").mkdir(parents=True)
    assert find_checkpoint(run) is None  # only an interrupted save: start fresh
    (run / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(CheckpointError, match="points to iteration 5 but .* does not exist"):
        find_checkpoint(run)


def _save_three(run_dir):
    from megatron_longpo.training.checkpointing import TrainState, save_training_checkpoint

    mcfg, g, model, ddp, opt, sched = _setup(1)
    for it in (1, 2, 3):
        save_training_checkpoint(run_dir, TrainState(it, it), model, opt, sched, {}, g, model_cfg=mcfg, keep_last=2)


def test_keep_last_prunes_oldest(tmp_path):
    run = tmp_path / "run"
    run_distributed(_save_three, 1, args=(str(run),))
    assert sorted(d.name for d in run.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
