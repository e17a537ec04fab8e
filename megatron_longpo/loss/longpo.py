"""The LongPO objective on per-pair log-prob sums: pure math, no collectives.

    L = nll_weight * NLL + lam * mean_b[ -log sigmoid( beta * ((P_w - R_w) - (P_l - R_l)) ) ]

P_w / P_l: policy log-probs of the chosen / rejected responses on the LONG context (summed over
response tokens of every turn, no length normalisation). R_w / R_l: reference log-probs of the
same responses, on the SHORT context (mode ``longpo``) or on the long one (mode ``dpo``); the
math is the same, only where the cached reference comes from differs. Mode ``sft`` drops the
preference term (L = nll_weight * NLL) and needs no reference.

Dtype: everything is computed in float64. A log-prob sum over a 512K-token sequence is ~1e6 in
magnitude; fp32 resolves that to ~0.06, which is the same order as the differences
``P_w - R_w`` that the preference term is made of. The inputs are [B]-sized, so float64 costs
nothing; the gradient flows back into whatever dtype the per-token log-probs had.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_longpo.config import LossConfig

# Metric names logged per step (TRL DPOTrainer names), in logging order.
METRIC_NAMES = (
    "loss",
    "nll_loss",
    "pref_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logps/ref_chosen",
    "logps/ref_rejected",
)
# Metrics that need reference log-probs (absent in sft mode without a reference).
REFERENCE_METRICS = (
    "pref_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/ref_chosen",
    "logps/ref_rejected",
)


def nll_term(
    nll_sum: torch.Tensor,  # [B] summed NLL of each pair's NLL target
    nll_count: torch.Tensor,  # [B] tokens in each pair's NLL target
    reduction: str,
    token_normalizer: Optional[float | torch.Tensor] = None,
) -> torch.Tensor:
    """Scalar NLL of a micro-batch (float64).

    ``sequence_mean``: mean over pairs of sum_b / count_b (a pair with no NLL token counts 0).
    ``token_mean``: sum of every pair's NLL / ``token_normalizer``; the normalizer defaults to
    this micro-batch's token count (pooling within the micro-batch). To pool over a whole global
    batch split into micro-batches, pass the mean NLL-token count per micro-batch of that global
    batch: the mean over micro-batches of this value is then exactly the pooled NLL.
    """
    s = nll_sum.to(torch.float64)
    c = nll_count.to(torch.float64)
    if reduction == "sequence_mean":
        return (s / c.clamp(min=1.0)).mean()
    if reduction == "token_mean":
        if token_normalizer is None:
            norm = c.sum().clamp(min=1.0)
        else:
            if isinstance(token_normalizer, (int, float)):  # checked on the host: no device sync
                if not token_normalizer > 0:
                    raise ValueError(f"token_normalizer must be > 0, got {token_normalizer}")
            elif not bool(token_normalizer > 0):
                raise ValueError(f"token_normalizer must be > 0, got {float(token_normalizer)}")
            norm = torch.as_tensor(token_normalizer, dtype=torch.float64, device=s.device)
        return s.sum() / norm
    raise ValueError(f"loss.nll_reduction={reduction!r}; expected 'sequence_mean' or 'token_mean'")


def longpo_loss(
    policy_chosen_logps: torch.Tensor,  # [B] P_w
    policy_rejected_logps: torch.Tensor,  # [B] P_l
    ref_chosen_logps: Optional[torch.Tensor],  # [B] R_w (None allowed in sft mode)
    ref_rejected_logps: Optional[torch.Tensor],  # [B] R_l
    nll_sum: torch.Tensor,  # [B]
    nll_count: torch.Tensor,  # [B]
    config: LossConfig,
    token_normalizer: Optional[float | torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (loss: float64 scalar with grad, metrics: detached float64 scalars).

    Every metric is a mean over the B pairs of the micro-batch (nll_loss as :func:`nll_term`),
    so with equal micro-batch sizes the mean of a metric over micro-batches is its value on the
    union of those micro-batches.
    """
    b = policy_chosen_logps.shape
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps must have shape [B], got {tuple(b)}")
    named = dict(
        policy_rejected_logps=policy_rejected_logps, nll_sum=nll_sum, nll_count=nll_count,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    for name, t in named.items():
        if t is not None and t.shape != b:
            raise ValueError(f"{name} must have shape {tuple(b)} like policy_chosen_logps, got {tuple(t.shape)}")
    if config.mode not in ("longpo", "dpo", "sft"):
        raise ValueError(f"loss.mode={config.mode!r}; expected 'longpo', 'dpo' or 'sft'")
    has_ref = ref_chosen_logps is not None and ref_rejected_logps is not None
    if config.mode != "sft" and not has_ref:
        raise ValueError(
            f"loss.mode={config.mode} needs reference log-probs (ref_chosen_logps and "
            "ref_rejected_logps); set reference.cache_path or use loss.mode=sft"
        )

    f64 = torch.float64
    pw, pl = policy_chosen_logps.to(f64), policy_rejected_logps.to(f64)
    nll = nll_term(nll_sum, nll_count, config.nll_reduction, token_normalizer)
    metrics: dict[str, torch.Tensor] = {"nll_loss": nll}
    loss = config.nll_weight * nll
    if has_ref:
        rw, rl = ref_chosen_logps.to(f64), ref_rejected_logps.to(f64)
        chosen_rewards = config.beta * (pw - rw)  # [B]
        rejected_rewards = config.beta * (pl - rl)  # [B]
        pref = -F.logsigmoid(chosen_rewards - rejected_rewards)  # [B]
        pref_loss = pref.mean()
        if config.mode != "sft":
            loss = loss + config.lam * pref_loss
        metrics.update({
            "pref_loss": pref_loss,
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(f64).mean(),
            "logps/ref_chosen": rw.mean(),
            "logps/ref_rejected": rl.mean(),
        })
    metrics["loss"] = loss
    metrics["logps/chosen"] = pw.mean()
    metrics["logps/rejected"] = pl.mean()
    # clone: Megatron's schedule scales the returned loss in place; a detached view would follow.
    out = {k: metrics[k].detach().clone() for k in METRIC_NAMES if k in metrics}
    return loss, out
