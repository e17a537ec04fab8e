"""Pipeline parallelism (1F1B, interleaved VPP) equals the unpipelined step: loss, every metric,
every gradient, the clipped optimizer step.

Reference: the same micro-batches through forward_backward on ONE process (PP=1, TP=1, CP=1),
itself proven equal to a serial float64 brute force by test_step_parallel.py. Pipelined runs:
Megatron's 1F1B / interleaved schedules over real gloo p2p, micro-batches of different lengths
(padded to one shape by forward_backward), each stage's gradients gathered to the full layout.
"""

import dataclasses
import math

import pytest
import torch

from megatron_longpo.config import LossConfig
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, tiny_model_config
from megatron_longpo.testing.pairs import make_pairs, raw_pair_batch

pytestmark = pytest.mark.distributed

SPEC = [(9, [12], [8]), (6, [20], [15]), (13, [5], [11]), (7, [9], [4])]
LENGTHS = (44, 52)  # micro-batch lengths alternate: the step pads them to one exchanged shape
LONGPO = dict(mode="longpo", beta=0.1, lam=1.0, nll_weight=1.0, nll_reduction="token_mean")
LAYERS = 4


def micro_batches(layout: str, mbs: int, vocab: int, seed: int):
    pairs = make_pairs(SPEC, vocab, seed)
    return [raw_pair_batch(pairs[i:i + mbs], layout, LENGTHS[(i // mbs) % 2]) for i in range(0, len(pairs), mbs)]


def _ddp(chunk):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(
        config=chunk.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False,
                                                 check_for_nan_in_grad=True),
        module=chunk,
    )


def run_layout(layout: str, arch: str, seed: int, full_sd, tp: int = 1, cp: int = 1, pp: int = 1,
               vpp=None, mbs: int = 1, sp: bool = False, first=None, lr: float = 0.0):
    """One step (forward_backward, or train_step with SGD + clipping when lr > 0) on this layout.

    ``full_sd=None``: the reference run, weights from its own seeded init (returned).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_longpo.models.provider import build_model_chunks
    from megatron_longpo.models.sharding import gather_full_state_dict_chunks, load_full_state_dict_chunks
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.training.step import forward_backward, train_step

    mcfg = tiny_model_config(arch, num_layers=LAYERS)
    pcfg = parallel_config(tp=tp, cp=cp, sequence_parallel=sp, pipeline_model_parallel_size=pp,
                           virtual_pipeline_model_parallel_size=vpp, num_layers_in_first_pipeline_stage=first)
    g = init_model_parallel(pcfg)
    set_seed(seed if full_sd is None else seed + 100)
    chunks = build_model_chunks(mcfg, pcfg, pair_layout=layout)
    if full_sd is not None:
        load_full_state_dict_chunks(chunks, full_sd, g.tp_rank, g.tp_size)
    params = gather_full_state_dict_chunks(chunks, g.tp_group, g.pp_group, mcfg.vocab_size)
    ddps = [_ddp(c) for c in chunks]
    model = ddps if len(ddps) > 1 else ddps[0]
    micro = micro_batches(layout, mbs, mcfg.vocab_size, seed)
    cfg = LossConfig(**LONGPO)
    out = dict(params=params, stage=(g.pp_rank, [sum(1 for _ in c.decoder.layers) for c in chunks]))
    if lr > 0:
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="sgd", lr=lr, sgd_momentum=0.0, weight_decay=0.0, clip_grad=0.05), ddps)
        res = train_step(model, opt, micro, g, cfg, mcfg.vocab_size, sp)
        out.update(metrics=res.metrics, grad_norm=res.grad_norm,
                   new_params=gather_full_state_dict_chunks(chunks, g.tp_group, g.pp_group, mcfg.vocab_size))
    else:
        out["eval_metrics"] = forward_backward(model, micro, g, cfg, mcfg.vocab_size, sp, forward_only=True)
        out["metrics"] = forward_backward(model, micro, g, cfg, mcfg.vocab_size, sp)
    out["grads"] = gather_full_state_dict_chunks(chunks, g.tp_group, g.pp_group, mcfg.vocab_size, grads=True)
    return out


_REF: dict = {}


def _reference(layout, arch, seed, mbs, lr=0.0):
    key = (layout, arch, seed, mbs, lr)
    if key not in _REF:
        _REF[key] = run_distributed(run_layout, 1, args=(layout, arch, seed, None), kwargs=dict(mbs=mbs, lr=lr))[0]
    return _REF[key]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


def _compare(outs, ref, keys=("metrics", "eval_metrics")):
    for out in outs:
        for key in keys:
            assert set(out[key]) == set(ref[key]), key
            for k, v in ref[key].items():
                if k in ("tokens_per_sec", "tflops_per_gpu"):
                    continue
                assert _close(out[key][k], v), (key, k, out[key][k], v)
        assert set(out["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            assert g.abs().sum() > 0, f"reference gradient of {name} is zero: the test would be vacuous"
            torch.testing.assert_close(out["grads"][name], g, rtol=2e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "layout,arch,tp,cp,pp,vpp,mbs,first,sp",
    [
        ("two_sequences", "mistral", 1, 1, 2, None, 1, None, False),  # 1F1B, 4 micro-batches of 2 lengths
        ("shared_prefix", "mistral", 1, 1, 2, None, 2, None, False),  # 2 micro-batches of 2 pairs
        ("two_sequences", "qwen2", 1, 1, 2, 2, 1, None, False),  # interleaved (VPP=2); tied embedding, QKV bias
        ("two_sequences", "qwen2", 1, 1, 2, None, 1, 3, False),  # uneven split: 3 + 1 layers; tied embedding
        ("two_sequences", "mistral", 2, 1, 2, None, 1, None, True),  # PP x TP with sequence parallel
        ("shared_prefix", "mistral", 1, 2, 2, None, 1, None, False),  # PP x CP (project CP attention)
    ],
)
def test_pipeline_step_matches_unpipelined(layout, arch, tp, cp, pp, vpp, mbs, first, sp):
    seed = 7
    ref = _reference(layout, arch, seed, mbs)
    outs = run_distributed(run_layout, tp * cp * pp, args=(layout, arch, seed, ref["params"]),
                           kwargs=dict(tp=tp, cp=cp, pp=pp, vpp=vpp, mbs=mbs, first=first, sp=sp), timeout=300)
    stages = {o["stage"][0]: o["stage"][1] for o in outs}
    expect = {0: [first], 1: [LAYERS - first]} if first else {r: [LAYERS // pp // (vpp or 1)] * (vpp or 1)
                                                              for r in range(pp)}
    assert stages == expect  # each stage built only its own layers
    _compare(outs, ref)


def test_pipeline_train_step_clips_over_all_stages():
    """SGD with clip_grad below the gradient norm: the norm covers every stage, so the clipped
    update (and the norm) equal the unpipelined step."""
    seed, lr = 7, 0.5
    ref = _reference("two_sequences", "qwen2", seed, 1, lr)
    assert ref["grad_norm"] > 0.05  # clipping is active
    outs = run_distributed(run_layout, 2, args=("two_sequences", "qwen2", seed, ref["params"]),
                           kwargs=dict(pp=2, mbs=1, lr=lr), timeout=300)
    _compare(outs, ref, keys=("metrics",))
    for out in outs:
        assert _close(out["grad_norm"], ref["grad_norm"])
        for name, p in ref["new_params"].items():
            torch.testing.assert_close(out["new_params"][name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
