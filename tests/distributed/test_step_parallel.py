"""The Megatron-scheduled LongPO step under TP / SP / DP and micro-batching equals one serial step.

Reference (independent of loss/ and training/step.py): one process, TP=1, the whole global batch
of 4 pairs at once, full logits from the model's own output layer, float64 log_softmax, per-pair
sums by loops over segment ids, and the objective written out. Parallel runs go through
forward_backward (Megatron DDP + forward_backward_no_pipelining + finalize_model_grads) with the
global batch split over DP ranks and micro-batches; their averaged metrics and every parameter
gradient (gathered to the TP=1 layout) must match. This proves the loss scaling: x cp and
1/num_microbatches from the schedule, 1/(dp*cp) from DDP (docs/loss.md). CP > 1 runs through the
project's context-parallel attention.
"""

import math

import pytest
import torch

from megatron_longpo.config import LossConfig
from megatron_longpo.data.batch import PairBatch
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, tiny_model_config
from megatron_longpo.testing.pairs import make_pairs, raw_pair_batch, select_pairs

pytestmark = pytest.mark.distributed

ARCH = "mistral"  # vocab 300: padded to 384 at TP=1 and 512 at TP=2, GQA 4:1
SEQ = 32
PAIRS = 4  # global batch


# Pair shapes (prefix length, [chosen response], [rejected response]): two_sequences rows of
# different lengths (so token_mean pooling differs from per-micro-batch pooling), all within SEQ.
STEP_PAIRS = [(9, [12], [8]), (6, [20], [15]), (13, [5], [11]), (7, [9], [4])]
SMALL_PAIRS = [(5, [4], [3]), (6, [3], [6])]  # fits 16 tokens


def make_pair_batch(seed: int, vocab: int, nll_target: str = "sequence", nll_on: str = "chosen") -> PairBatch:
    """The global batch of PAIRS pairs (two_sequences, SEQ tokens)."""
    return raw_pair_batch(make_pairs(STEP_PAIRS, vocab, seed), "two_sequences", SEQ, nll_target, nll_on)


def _nll_on(cfg: LossConfig) -> str:
    return "rejected" if cfg.mode == "sft_rejected" else "chosen"


def _ddp(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=model,
    )


def reference(loss_kw: dict, seed: int, nll_target: str, arch: str = ARCH):
    """Serial brute force on the whole global batch (TP=1, no DDP; the model in fp32, log_softmax, sums
    and objective in float64)."""
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.sharding import gather_full_state_dict
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed

    cfg = LossConfig(**loss_kw)
    mcfg = tiny_model_config(arch)
    g = init_model_parallel(parallel_config())
    set_seed(seed)
    model = build_model(mcfg, parallel_config())
    params = gather_full_state_dict(model, g.tp_group, mcfg.vocab_size)
    batch = make_pair_batch(seed, mcfg.vocab_size, nll_target, _nll_on(cfg))
    logits = model(batch.tokens, batch.position_ids, None)[..., : mcfg.vocab_size]  # [rows, S, V]
    logp = torch.log_softmax(logits.double(), -1).gather(2, batch.target_ids[..., None]).squeeze(2)
    pw = torch.stack([logp[batch.response_segment == b].sum() for b in range(PAIRS)])
    pl = torch.stack([logp[batch.response_segment == PAIRS + b].sum() for b in range(PAIRS)])
    nll_sum = torch.stack([-logp[batch.nll_segment == b].sum() for b in range(PAIRS)])
    nll_cnt = torch.tensor([float((batch.nll_segment == b).sum()) for b in range(PAIRS)], dtype=torch.float64)
    if cfg.nll_reduction == "sequence_mean":
        nll = (nll_sum / nll_cnt).mean()
    else:
        nll = nll_sum.sum() / nll_cnt.sum()
    margin = cfg.beta * ((pw - batch.ref_chosen_logps) - (pl - batch.ref_rejected_logps))
    pref = -torch.nn.functional.logsigmoid(margin).mean()
    preference = cfg.mode in ("longpo", "dpo")
    loss = cfg.nll_weight * nll + (cfg.lam * pref if preference else 0.0)
    loss.backward()
    grads = gather_full_state_dict(model, g.tp_group, mcfg.vocab_size, grads=True)
    metrics = {"loss": float(loss), "logps/chosen": float(pw.mean()), "logps/rejected": float(pl.mean())}
    if cfg.nll_weight > 0:
        metrics["nll_loss"] = float(nll)
    if preference:
        metrics.update({"pref_loss": float(pref), "rewards/margins": float(margin.mean())})
    return dict(params=params, grads=grads, metrics=metrics)


def parallel(tp: int, sp: bool, mbs: int, full_sd: dict, loss_kw: dict, seed: int, nll_target: str,
             lr: float = 0.0, arch: str = ARCH, cp: int = 1, ep: int = 1, model_kw: dict | None = None,
             etp: int | None = None, optimizer: str = "sgd"):
    """This rank's share of the global batch through forward_backward (or train_step with lr > 0:
    plain SGD, or the project's rmsprop with clip_grad=CLIP)."""
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.sharding import ExpertShards, gather_full_state_dict, load_full_state_dict
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.training.step import forward_backward, train_step

    cfg = LossConfig(**loss_kw)
    mcfg = tiny_model_config(arch, **(model_kw or {}))
    pcfg = parallel_config(tp=tp, cp=cp, ep=ep, sequence_parallel=sp, expert_tensor_parallel_size=etp)
    g = init_model_parallel(pcfg)
    experts = ExpertShards.of(g)
    assert (experts.ep_size, experts.etp_size) == (ep, etp or tp), "the expert layout asked for is not the one built"
    set_seed(seed + 100)  # different init: the loaded weights must be what matters
    model = build_model(mcfg, pcfg)
    load_full_state_dict(model, full_sd, g.tp_rank, g.tp_size, experts)
    ddp = _ddp(model)
    batch = make_pair_batch(seed, mcfg.vocab_size, nll_target, _nll_on(cfg))
    per_rank = PAIRS // g.dp_size
    mine = list(range(g.dp_rank * per_rank, (g.dp_rank + 1) * per_rank))
    micro = [select_pairs(batch, mine[i:i + mbs]) for i in range(0, per_rank, mbs)]
    out = dict(num_microbatches=len(micro))
    if lr > 0:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from megatron_longpo.config import OptimConfig
        from megatron_longpo.training.optimizer import build_optimizer

        if optimizer == "sgd":
            opt = get_megatron_optimizer(
                OptimizerConfig(optimizer="sgd", lr=lr, sgd_momentum=0.0, weight_decay=0.0, clip_grad=1e6), [ddp]
            )
        else:
            opt, _ = build_optimizer([ddp], OptimConfig(optimizer=optimizer, lr=lr, lr_warmup_fraction=0.0,
                                                        lr_decay_style="constant", weight_decay=0.0, clip_grad=CLIP,
                                                        use_distributed_optimizer=False), mcfg, 1)
        out["inner"] = [type(w.optimizer).__name__ for w in getattr(opt, "chained_optimizers", [opt])]
        res = train_step(ddp, opt, micro, g, cfg, mcfg.vocab_size, sp)
        out.update(metrics=res.metrics, update_successful=res.update_successful, grad_norm=res.grad_norm,
                   params=gather_full_state_dict(model, g.tp_group, mcfg.vocab_size, experts=experts))
    else:
        # Evaluation first: same metrics, no gradient.
        out["eval_metrics"] = forward_backward(ddp, micro, g, cfg, mcfg.vocab_size, sp, forward_only=True)
        out["eval_grad_abs"] = sum(float(p.main_grad.abs().sum()) for p in model.parameters())
        out["metrics"] = forward_backward(ddp, micro, g, cfg, mcfg.vocab_size, sp)
    out["grads"] = gather_full_state_dict(model, g.tp_group, mcfg.vocab_size, grads=True, experts=experts)
    return out


_REF: dict = {}


def _reference(loss_kw, seed, nll_target, arch=ARCH):
    key = (tuple(sorted(loss_kw.items())), seed, nll_target, arch)
    if key not in _REF:
        _REF[key] = run_distributed(reference, 1, args=(loss_kw, seed, nll_target, arch))[0]
    return _REF[key]


def _compare(outs, ref):
    for out in outs:
        for k, v in ref["metrics"].items():
            assert math.isclose(out["metrics"][k], v, rel_tol=1e-5, abs_tol=1e-6), (k, out["metrics"][k], v)
        assert set(out["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            assert g.abs().sum() > 0, f"reference gradient of {name} is zero: the test would be vacuous"
            torch.testing.assert_close(out["grads"][name], g, rtol=2e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")


LONGPO = dict(mode="longpo", beta=0.1, lam=1.0, nll_weight=1.0, nll_reduction="sequence_mean")


@pytest.mark.parametrize(
    "tp,cp,dp,sp,mbs,arch",
    [
        (1, 1, 1, False, 2, ARCH),  # 2 micro-batches on one rank
        (2, 1, 1, False, 2, ARCH),
        (2, 1, 1, True, 1, ARCH),  # sequence parallel, 4 micro-batches
        (1, 1, 2, False, 1, ARCH),  # global batch 4 = dp 2 x 2 micro-batches of 1
        (2, 1, 2, True, 1, ARCH),
        (2, 1, 2, False, 1, "qwen2"),  # output layer tied to the embedding, QKV bias
        (2, 1, 1, False, 2, "qwen3"),  # QK-norm with the heads split over TP
        (1, 2, 1, False, 2, ARCH),  # context parallel (project CP attention): x cp loss scaling
        (1, 2, 2, False, 1, ARCH),  # CP x DP: DDP averages over dp*cp
        (2, 2, 1, True, 1, "qwen2"),  # TP x CP x SP
        (1, 2, 1, False, 2, "qwen3"),  # QK-norm under the project CP attention
    ],
)
def test_parallel_step_matches_serial(tp, cp, dp, sp, mbs, arch):
    seed = 21
    ref = _reference(LONGPO, seed, "sequence", arch)
    outs = run_distributed(parallel, tp * cp * dp,
                           args=(tp, sp, mbs, ref["params"], LONGPO, seed, "sequence", 0.0, arch, cp))
    assert all(o["num_microbatches"] == PAIRS // dp // mbs for o in outs)
    _compare(outs, ref)


@pytest.mark.parametrize(
    "tp,cp,dp,ep,etp,sp,mbs,arch,dispatcher",
    [
        (1, 1, 2, 2, None, False, 1, "qwen3_moe", "alltoall"),  # EP=2: 2 experts per rank, tokens sent over ranks
        (1, 1, 2, 2, None, False, 1, "mixtral", "allgather"),
        (2, 1, 2, 2, None, True, 1, "mixtral", "allgather"),  # EP=2 x TP=2 (4 ranks; MoE + TP needs SP)
        (2, 1, 1, 2, 1, True, 2, "mixtral", "alltoall"),  # ETP=1 under TP=2: EP=2 spans the TP ranks
        (1, 2, 1, 1, None, False, 2, "qwen3_moe", "allgather"),  # CP=2 with MoE
        (1, 2, 1, 2, None, False, 2, "qwen3_moe", "alltoall"),  # EP=2 spans CP=2 (qwen3_30b_a3b_128k's layout)
        (2, 1, 1, 1, None, True, 2, "qwen3_moe", "allgather"),  # TP=2 + SP: experts split over TP
    ],
)
def test_moe_parallel_step_matches_serial(tp, cp, dp, ep, etp, sp, mbs, arch, dispatcher):
    """LongPO loss and every gradient (router and each expert included) of a MoE model under EP /
    EP x TP / ETP=1 / EP x CP / CP equal the serial float64 brute force (dropless routing, so nothing
    is dropped). ETP=1 with EP over TP and CP is the layout of examples/configs/qwen3_30b_a3b_128k.yaml."""
    seed = 23
    ref = _reference(LONGPO, seed, "sequence", arch)
    assert any(".router." in n for n in ref["grads"]) and sum("local_experts" in n for n in ref["grads"]) == 2 * 4 * 2
    outs = run_distributed(parallel, tp * cp * dp,
                           args=(tp, sp, mbs, ref["params"], LONGPO, seed, "sequence", 0.0, arch, cp, ep,
                                 dict(moe_token_dispatcher=dispatcher), etp))
    _compare(outs, ref)


@pytest.mark.parametrize(
    "loss_kw,nll_target",
    [
        (dict(mode="longpo", beta=0.2, lam=0.5, nll_weight=1.0, nll_reduction="token_mean"), "sequence"),
        (dict(mode="dpo", beta=0.1, lam=1.0, nll_weight=0.0, nll_reduction="sequence_mean"), "responses"),
        (dict(mode="sft", nll_weight=1.0, nll_reduction="token_mean"), "responses"),
        (dict(mode="sft_rejected", nll_weight=1.0, nll_reduction="token_mean"), "sequence"),
        (dict(mode="sft_rejected", nll_weight=0.5, nll_reduction="sequence_mean"), "responses"),
    ],
)
def test_loss_scaling_over_microbatches_and_dp(loss_kw, nll_target):
    """dp 2 x 2 micro-batches of 1 pair == 1 process with all 4 pairs, in every objective / reduction.

    token_mean pools the NLL tokens of the whole global batch (pairs have different lengths, so a
    per-micro-batch pooling would give a different loss and gradient).
    """
    seed = 33
    ref = _reference(loss_kw, seed, nll_target)
    outs = run_distributed(parallel, 2, args=(1, False, 1, ref["params"], loss_kw, seed, nll_target))
    _compare(outs, ref)
    for out in outs:  # forward_only evaluation: the same averaged metrics, no gradient
        assert out["eval_grad_abs"] == 0
        for k, v in out["metrics"].items():
            assert math.isclose(out["eval_metrics"][k], v, rel_tol=1e-9, abs_tol=1e-12), k


@pytest.mark.parametrize(
    "tp,dp,ep,arch,seed,model_kw",
    [
        (2, 2, 1, ARCH, 21, {}),
        # EP=2 x DP=2: the global norm sums each expert once, the update reaches every expert shard
        (1, 2, 2, "mixtral", 23, dict(moe_token_dispatcher="alltoall")),
        # EP=2 x DP=4: two data-parallel copies of each expert shard (expert-DP group of 2, not the DP group
        # of 4): their gradients averaged over that group only, and counted once in the norm
        (1, 4, 2, "mixtral", 23, dict(moe_token_dispatcher="alltoall")),
    ],
)
def test_train_step_applies_the_global_batch_gradient(tp, dp, ep, arch, seed, model_kw):
    """SGD step of train_step: grad_norm = the serial gradient's norm, new weights = old - lr * reference gradient."""
    _check_step(tp, dp, ep, arch, seed, model_kw, "sgd", 0.5, lambda g: g, 1.0, 1e-6)


def test_rmsprop_step_with_expert_parallelism():
    """One rmsprop step (the 30B config's optimizer, clip_grad=1) at EP=2 x DP=2: both the dense and the
    expert optimizer of Megatron's chain are RMSprop, and every weight moves by torch.optim.RMSprop's
    first step on the serial gradient clipped by the serial norm: lr * g / (sqrt((1 - alpha) g^2) + eps)."""
    seed, ref = 23, _reference(LONGPO, 23, "sequence", "mixtral")
    coeff = min(1.0, CLIP / (_norm(ref["grads"]) + 1e-6))  # Megatron's clip_grad_norm
    assert coeff < 1  # the clip is exercised

    def rmsprop(g):
        g = g.double() * coeff
        return (g / (((1 - 0.99) * g * g).sqrt() + 1e-8)).float()

    outs = _check_step(1, 2, 2, "mixtral", seed, dict(moe_token_dispatcher="alltoall"), "rmsprop", 1e-3, rmsprop, coeff,
                       1e-5)  # 1e-3 of the step lr / sqrt(1 - alpha): where |g| ~ eps float32 noise counts
    assert all(o["inner"] == ["RMSprop", "RMSprop"] for o in outs)  # dense chain + expert chain


CLIP = 1.0


def _norm(grads: dict) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def _check_step(tp, dp, ep, arch, seed, model_kw, optimizer, lr, direction, clip_coeff, atol):
    """train_step at tp x dp (x ep) from the serial reference's weights: its grad_norm is the serial one,
    its gradients the serial ones (times clip_coeff: clipping scales them in place) and each weight
    becomes old - lr * direction(serial gradient)."""
    ref = _reference(LONGPO, seed, "sequence", arch)
    outs = run_distributed(parallel, tp * dp, args=(tp, False, 1, ref["params"], LONGPO, seed, "sequence", lr, arch,
                                                    1, ep, model_kw, None, optimizer))
    _compare(outs, dict(ref, grads={n: g * clip_coeff for n, g in ref["grads"].items()}))
    ref_norm = _norm(ref["grads"])
    for out in outs:
        assert out["update_successful"]
        assert math.isclose(out["grad_norm"], ref_norm, rel_tol=1e-4), (out["grad_norm"], ref_norm)
        assert out["metrics"]["grad_norm"] == out["grad_norm"]
        for name, p in ref["params"].items():
            torch.testing.assert_close(out["params"][name], p - lr * direction(ref["grads"][name]), rtol=1e-4,
                                       atol=atol, msg=lambda m: f"{name}: {m}")
    return outs


def test_bad_batches_are_rejected_before_the_model_runs():
    from megatron_longpo.runtime.distributed import ParallelGroups
    from megatron_longpo.training.step import microbatch_forward, validate_batch

    groups = ParallelGroups(None, None, None, None, 0, 1, 0, 1, 0, 1)
    cfg = LossConfig()
    good = raw_pair_batch(make_pairs(SMALL_PAIRS, 100, 0), "two_sequences", 16)
    validate_batch(good, groups, False, cfg)
    no_ref = select_pairs(good, [0, 1])
    no_ref.ref_chosen_logps = None
    with pytest.raises(ValueError, match="needs PairBatch.ref_chosen_logps"):
        validate_batch(no_ref, groups, False, cfg)
    validate_batch(no_ref, groups, False, LossConfig(mode="sft"))
    bad_seg = select_pairs(good, [0, 1])
    bad_seg.nll_segment[0, 0] = 2
    with pytest.raises(ValueError, match="segment ids out of range"):
        validate_batch(bad_seg, groups, False, cfg)
    cp2 = ParallelGroups(None, None, None, None, 0, 1, 0, 3, 0, 1)
    with pytest.raises(ValueError, match="not a multiple of 6"):
        validate_batch(good, cp2, False, cfg)
    shared = select_pairs(good, [0, 1])
    shared.layout = "shared_prefix"
    for name in ("tokens", "position_ids", "target_ids", "response_segment", "nll_segment", "branch_ids"):
        setattr(shared, name, getattr(shared, name)[:2])
    shared.response_segment = shared.response_segment.clamp(max=3)

    class PlainCausalModel(torch.nn.Module):  # Megatron's attention: no branch mask, no explicit RoPE
        explicit_rope = False

        def output_weight(self):
            return torch.zeros(128, 8)

    with pytest.raises(ValueError, match="shared_prefix needs the project attention"):
        microbatch_forward(PlainCausalModel(), shared, groups, cfg, 100, False)


AUX = dict(moe_aux_loss_coeff=0.05)


def aux_probe(full_sd: dict, seed: int, arch: str):
    """Serial run (TP=1, 4 micro-batches of 1 pair) with the aux loss on, plus an independent
    float64 evaluation of the Switch load-balancing loss from each router's captured input."""
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.sharding import load_full_state_dict
    from megatron_longpo.runtime.distributed import init_model_parallel
    from megatron_longpo.training.step import forward_backward

    mcfg = tiny_model_config(arch, **AUX)
    pcfg = parallel_config()
    g = init_model_parallel(pcfg)
    model = build_model(mcfg, pcfg)
    load_full_state_dict(model, full_sd, 0, 1)
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for name, mod in model.named_modules():
        if name.endswith("mlp.router"):
            mod.register_forward_hook(lambda m, args, out, name=name: seen.append(
                (name, args[0].detach().double(), m.weight.detach().double())))
    ddp = _ddp(model)
    batch = make_pair_batch(seed, mcfg.vocab_size, "sequence")
    micro = [select_pairs(batch, [i]) for i in range(PAIRS)]
    metrics = forward_backward(ddp, micro, g, LossConfig(**LONGPO), mcfg.vocab_size, False)
    E, k = mcfg.num_experts, mcfg.moe_router_topk
    last = f"decoder.layers.{mcfg.num_layers - 1}.mlp.router"
    w_last = dict(model.named_parameters())[f"{last}.weight"].detach().double().requires_grad_(True)
    total, last_total = 0.0, torch.zeros((), dtype=torch.float64)
    for name, x, w in seen:  # one entry per (micro-batch, layer)
        if name == last:  # the last router's input does not depend on its own weight
            w = w_last
        probs = torch.softmax(x.reshape(-1, x.shape[-1]) @ w.T, -1)  # [T, E]
        counts = torch.zeros(E, dtype=torch.float64).index_add_(
            0, probs.topk(k, -1).indices.reshape(-1), torch.ones(probs.shape[0] * k, dtype=torch.float64))
        T = probs.shape[0]
        switch = E / (k * T * T) * (probs.sum(0) * counts).sum()
        total += float(switch)
        if w is w_last:
            last_total = last_total + switch
    assert len(seen) == PAIRS * mcfg.num_layers
    # Megatron scales each micro-batch's aux loss by 1 / num_microbatches, like the main loss
    (last_grad,) = torch.autograd.grad(AUX["moe_aux_loss_coeff"] * last_total / PAIRS, w_last)
    return dict(metric=metrics["moe/aux_loss"], independent=AUX["moe_aux_loss_coeff"] * total / PAIRS,
                last_router=last + ".weight", last_grad=last_grad.float())


def test_moe_aux_loss_value_gradient_and_ep2():
    """moe/aux_loss equals the Switch loss recomputed in float64 from the routers' inputs; with it
    on, every router gradient changes (the term reaches them), the last router's by exactly the
    float64 autograd of its Switch loss, and EP=2 still equals the serial run."""
    seed, arch = 23, "qwen3_moe"
    ref = _reference(LONGPO, seed, "sequence", arch)
    (probe,) = run_distributed(aux_probe, 1, args=(ref["params"], seed, arch))
    assert probe["metric"] > 0
    assert math.isclose(probe["metric"], probe["independent"], rel_tol=1e-5), probe
    (serial,) = run_distributed(parallel, 1, args=(1, False, 1, ref["params"], LONGPO, seed, "sequence", 0.0, arch,
                                                   1, 1, AUX))
    routers = [n for n in ref["grads"] if n.endswith("mlp.router.weight")]
    for n in routers:
        assert (serial["grads"][n] - ref["grads"][n]).abs().max() > 1e-6, f"aux loss gradient does not reach {n}"
    # Its size: the last router's gradient grows by the float64 autograd of its Switch loss
    # (the forward is unchanged by the aux loss, so the rest of the gradient is the reference's).
    n = probe["last_router"]
    added = serial["grads"][n] - ref["grads"][n]
    assert probe["last_grad"].abs().max() > 1e-3  # (about 6x the LongPO gradient of that weight)
    torch.testing.assert_close(added, probe["last_grad"], rtol=1e-4, atol=1e-8)
    assert math.isclose(serial["metrics"]["moe/aux_loss"], probe["metric"], rel_tol=1e-6)
    outs = run_distributed(parallel, 2, args=(1, False, 1, ref["params"], LONGPO, seed, "sequence", 0.0, arch,
                                              1, 2, AUX))
    _compare(outs, serial)
