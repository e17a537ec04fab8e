"""longpo_loss against a float64 brute force written with Python floats, for every objective
(loss.mode: longpo, dpo, sft, sft_rejected) and reduction; the objective registry's declarations."""

import math
import typing

import pytest
import torch

from megatron_longpo.config import LossConfig
from megatron_longpo.loss.longpo import METRIC_NAMES, REFERENCE_METRICS, longpo_loss
from megatron_longpo.objectives import OBJECTIVE_NAMES, get_objective

# Written out here, independently of the registry: (reference, preference term, NLL on).
PAPER_ARMS = {
    "longpo": ("short", True, "chosen"),
    "dpo": ("long", True, "chosen"),
    "sft": (None, False, "chosen"),
    "sft_rejected": (None, False, "rejected"),
}


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def brute_force(pw, pl, rw, rl, nll_sum, nll_count, cfg, token_normalizer=None):
    """Python-float implementation of the objective and the TRL metrics (per-pair loops).
    ``nll_sum`` / ``nll_count`` are the sums over whichever sequence the objective's NLL is on."""
    B = len(pw)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    _, preference, _ = PAPER_ARMS[cfg.mode]
    m = {"logps/chosen": mean(pw), "logps/rejected": mean(pl)}
    loss = 0.0
    if cfg.nll_weight > 0:
        if cfg.nll_reduction == "sequence_mean":
            nll = mean([s / max(c, 1.0) for s, c in zip(nll_sum, nll_count)])
        else:
            norm = token_normalizer if token_normalizer is not None else max(sum(nll_count), 1.0)
            nll = sum(nll_sum) / norm
        m["nll_loss"] = nll
        loss += cfg.nll_weight * nll
    if preference:
        cr = [cfg.beta * (pw[i] - rw[i]) for i in range(B)]
        rr = [cfg.beta * (pl[i] - rl[i]) for i in range(B)]
        pref = mean([-_logsigmoid(cr[i] - rr[i]) for i in range(B)])
        loss += cfg.lam * pref
        m.update({
            "pref_loss": pref, "rewards/chosen": mean(cr), "rewards/rejected": mean(rr),
            "rewards/margins": mean([cr[i] - rr[i] for i in range(B)]),
            "rewards/accuracies": mean([1.0 if cr[i] > rr[i] else 0.0 for i in range(B)]),
            "logps/ref_chosen": mean(rw), "logps/ref_rejected": mean(rl),
        })
    m["loss"] = loss
    return loss, m


def _inputs(B, seed, dtype=torch.float64, scale=60.0):
    g = torch.Generator().manual_seed(seed)
    pw = -scale * torch.rand(B, generator=g, dtype=torch.float64)
    pl = -scale * torch.rand(B, generator=g, dtype=torch.float64)
    rw = pw + 8 * torch.randn(B, generator=g, dtype=torch.float64)
    rl = pl + 8 * torch.randn(B, generator=g, dtype=torch.float64)
    cnt = torch.randint(1, 500, (B,), generator=g).to(torch.float64)
    cnt[0] = 0.0  # a pair without NLL tokens: counted as 0, never a division by zero
    nll = 2.5 * cnt * torch.rand(B, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (pw, pl, rw, rl, nll, cnt)]


def _check(cfg, inputs, token_normalizer=None, with_ref=True):
    pw, pl, rw, rl, nll, cnt = inputs
    if not with_ref:
        rw = rl = None
    loss, metrics = longpo_loss(pw, pl, rw, rl, nll if cfg.nll_weight > 0 else None,
                                cnt if cfg.nll_weight > 0 else None, cfg, token_normalizer=token_normalizer)
    as_list = lambda t: None if t is None else [float(x) for x in t]  # noqa: E731
    ref_loss, ref_m = brute_force(*map(as_list, (pw, pl, rw, rl, nll, cnt)), cfg, token_normalizer)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert math.isclose(float(loss), ref_loss, rel_tol=1e-12, abs_tol=1e-12)
    assert list(metrics) == [k for k in METRIC_NAMES if k in ref_m]
    assert list(metrics) == list(get_objective(cfg.mode).metric_names(cfg.nll_weight))
    for k, v in ref_m.items():
        assert not metrics[k].requires_grad
        assert math.isclose(float(metrics[k]), v, rel_tol=1e-12, abs_tol=1e-12), (k, float(metrics[k]), v)
    return loss, metrics


@pytest.mark.parametrize("mode", list(PAPER_ARMS))
@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(mode, reduction, seed):
    cfg = LossConfig(mode=mode, beta=0.1 + 0.3 * seed, lam=0.7, nll_weight=0.6, nll_reduction=reduction)
    _check(cfg, _inputs(7, seed))
    if PAPER_ARMS[mode][0] is None:  # no reference needed; one passed in is ignored
        _check(cfg, _inputs(7, seed), with_ref=False)


@pytest.mark.parametrize("mode", ["longpo", "dpo"])
def test_zero_nll_weight_drops_the_nll_term(mode):
    """nll_weight=0: no NLL input needed, no nll_loss metric, the loss is the preference term alone."""
    cfg = LossConfig(mode=mode, beta=0.2, lam=0.9, nll_weight=0.0)
    _, m = _check(cfg, _inputs(5, 4))
    assert "nll_loss" not in m


def test_registry_declares_the_paper_arms():
    assert set(OBJECTIVE_NAMES) == set(PAPER_ARMS)
    hints = typing.get_type_hints(LossConfig)
    assert set(typing.get_args(hints["mode"])) == set(PAPER_ARMS)  # loss.mode accepts every objective
    for name, (ref, pref, nll_on) in PAPER_ARMS.items():
        o = get_objective(name)
        assert (o.reference, o.preference, o.nll_on) == (ref, pref, nll_on)
        assert o.reference_mode == {"short": "longpo", "long": "dpo", None: None}[ref]
        assert o.terms(1.0) == (("nll",) + (("preference",) if pref else ()))
        assert o.terms(0.0) == (("preference",) if pref else ())
        assert o.scores_nll(0.0) is False and o.scores_nll(0.5) is True
        assert set(o.metric_names(1.0)) >= {"loss", "logps/chosen", "logps/rejected", "nll_loss"}
        assert bool(set(o.metric_names(1.0)) & set(REFERENCE_METRICS)) == pref
    with pytest.raises(ValueError, match="choose from"):
        get_objective("ipo")


def test_defaults_are_the_released_hyperparameters():
    cfg = LossConfig()
    assert (cfg.mode, cfg.beta, cfg.lam, cfg.nll_weight, cfg.nll_reduction) == (
        "longpo", 0.01, 0.01, 1.0, "sequence_mean")
    _check(cfg, _inputs(5, 3))


def test_512k_sized_sums_keep_their_small_differences():
    # Sums over 512K tokens are ~1e6; the preference term lives on differences of ~0.1 between
    # them, which fp32 (spacing 0.0625 at 1e6) would round away. The math must stay in fp64.
    cfg = LossConfig(beta=0.5, lam=1.0)
    pw = torch.tensor([-1_000_000.25, -523_001.5], dtype=torch.float64)
    pl = pw - torch.tensor([0.75, -1.25], dtype=torch.float64)
    rw, rl = pw + 0.5, pl - 0.125
    inputs = [pw, pl, rw, rl, torch.tensor([1.2e6, 9.9e5], dtype=torch.float64), torch.tensor([5.2e5, 4.0e5], dtype=torch.float64)]
    loss, m = _check(cfg, inputs)
    # margin = beta * ((pw - rw) - (pl - rl)) = 0.5 * (-0.5 - 0.125) per pair
    assert math.isclose(float(m["rewards/margins"]), 0.5 * (-0.625), rel_tol=1e-12)


def test_token_normalizer_pools_over_microbatches():
    cfg = LossConfig(nll_reduction="token_mean", lam=0.3, beta=0.2)
    pw, pl, rw, rl, nll, cnt = _inputs(6, 5)
    _, whole = longpo_loss(pw, pl, rw, rl, nll, cnt, cfg)
    norm = float(cnt.sum()) / 3  # mean NLL tokens per micro-batch of 2 pairs
    parts = [
        longpo_loss(pw[i:i + 2], pl[i:i + 2], rw[i:i + 2], rl[i:i + 2], nll[i:i + 2], cnt[i:i + 2], cfg,
                    token_normalizer=norm)[1]
        for i in (0, 2, 4)
    ]
    for k in whole:
        avg = sum(float(p[k]) for p in parts) / 3
        assert math.isclose(avg, float(whole[k]), rel_tol=1e-12, abs_tol=1e-12), k


def test_gradient_matches_finite_differences():
    pw, pl, rw, rl, nll, cnt = _inputs(4, 9)
    cnt[0] = 3.0
    for mode in PAPER_ARMS:
        for reduction in ("sequence_mean", "token_mean"):
            cfg = LossConfig(mode=mode, beta=0.3, lam=0.8, nll_weight=0.5, nll_reduction=reduction)
            f = lambda a, b, c: longpo_loss(a, b, rw, rl, c, cnt, cfg)[0]  # noqa: E731
            args = tuple(t.clone().requires_grad_() for t in (pw, pl, nll))
            assert torch.autograd.gradcheck(f, args)


def test_metrics_do_not_alias_the_loss():
    # Megatron's schedule does `output_tensor *= cp; output_tensor /= num_microbatches` in place.
    pw, pl, rw, rl, nll, cnt = _inputs(3, 2)
    loss, m = longpo_loss(pw.requires_grad_(), pl, rw, rl, nll, cnt, LossConfig())
    before = float(m["loss"])
    loss *= 4.0
    assert float(m["loss"]) == before


def test_errors_name_the_problem():
    pw, pl, rw, rl, nll, cnt = _inputs(3, 2)
    with pytest.raises(ValueError, match="reference log-probs"):
        longpo_loss(pw, pl, None, None, nll, cnt, LossConfig(mode="longpo"))
    with pytest.raises(ValueError, match="ref_rejected_logps must have shape"):
        longpo_loss(pw, pl, rw, rl[:2], nll, cnt, LossConfig())
    with pytest.raises(ValueError, match="loss.mode"):
        longpo_loss(pw, pl, rw, rl, nll, cnt, LossConfig(mode="ipo"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs nll_sum"):
        longpo_loss(pw, pl, rw, rl, None, None, LossConfig(mode="sft_rejected"))
    with pytest.raises(ValueError, match="nll_reduction"):
        longpo_loss(pw, pl, rw, rl, nll, cnt, LossConfig(nll_reduction="sum"))  # type: ignore[arg-type]


def test_config_rules():
    from megatron_longpo.config import ConfigError, load_config, validate

    validate(load_config(None))
    with pytest.raises(ConfigError, match="loss.lam"):
        validate(load_config(None, ["--loss.lam=-0.1"]))
    for mode in ("sft", "sft_rejected"):
        with pytest.raises(ConfigError, match="trains nothing"):
            validate(load_config(None, [f"--loss.mode={mode}", "--loss.nll_weight=0"]))
    with pytest.raises(ConfigError, match="trains nothing"):
        validate(load_config(None, ["--loss.mode=longpo", "--loss.nll_weight=0", "--loss.lam=0"]))
    validate(load_config(None, ["--loss.mode=dpo", "--loss.nll_weight=0"]))
    validate(load_config(None, ["--loss.mode=sft_rejected"]))
    with pytest.raises(ConfigError, match="loss.mode"):
        load_config(None, ["--loss.mode=ipo"])
