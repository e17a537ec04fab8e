"""The training objectives on per-pair log-prob sums: pure math, no collectives.

    L = nll_weight * NLL + lam * mean_b[ -log sigmoid( beta * ((P_w - R_w) - (P_l - R_l)) ) ]

P_w / P_l: policy log-probs of the chosen / rejected responses on the LONG context (summed over
response tokens of every turn, no length normalisation). R_w / R_l: reference log-probs of the
same responses, on the SHORT context (``longpo``) or on the long one (``dpo``); the math is the
same, only where the cached reference comes from differs. Which terms an objective has, which
sequence its NLL is on (chosen, or rejected for ``sft_rejected``) and which metrics it logs is
the registry's (megatron_longpo/objectives.py); this module computes exactly those, and
:func:`scored_segments` says which segments the caller scores for them (a zero-weight NLL is not
scored): the step scores those, the FLOP count of the throughput counts their positions.

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
from megatron_longpo.objectives import METRIC_NAMES, REFERENCE_METRICS, get_objective

__all__ = ["METRIC_NAMES", "REFERENCE_METRICS", "longpo_loss", "nll_term", "scored_positions", "scored_segments"]


def scored_segments(config: LossConfig, response_segment: torch.Tensor, nll_segment: torch.Tensor,
                    num_pairs: int) -> tuple[list[torch.Tensor], list[int]]:
    """The segment-id sets the policy's log-prob sums run over for ``config.mode``, and their
    segment counts: the 2B responses (P_w, P_l), then the B NLL segments only when the objective
    scores the NLL (a zero-weight NLL is not: with ``nll_target=sequence`` that would be every
    position of the NLL sequence)."""
    if get_objective(config.mode).scores_nll(config.nll_weight):
        return [response_segment, nll_segment], [2 * num_pairs, num_pairs]
    return [response_segment], [2 * num_pairs]


def scored_positions(config: LossConfig, response_segment: torch.Tensor, nll_segment: torch.Tensor) -> int:
    """Positions in any :func:`scored_segments` set (host tensors): where the step computes logits,
    the logit positions of the FLOP count."""
    ids, _ = scored_segments(config, response_segment, nll_segment, num_pairs=0)
    need = torch.zeros_like(response_segment, dtype=torch.bool)
    for seg in ids:
        need |= seg >= 0
    return int(need.sum())


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
    ref_chosen_logps: Optional[torch.Tensor],  # [B] R_w (None when the objective needs no reference)
    ref_rejected_logps: Optional[torch.Tensor],  # [B] R_l
    nll_sum: Optional[torch.Tensor],  # [B] summed NLL of each pair's NLL target (None when not scored)
    nll_count: Optional[torch.Tensor],  # [B]
    config: LossConfig,
    token_normalizer: Optional[float | torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (loss: float64 scalar with grad, metrics: detached float64 scalars) of the objective
    ``config.mode``; the metrics are exactly ``objective.metric_names(config.nll_weight)``.

    Every metric is a mean over the B pairs of the micro-batch (nll_loss as :func:`nll_term`),
    so with equal micro-batch sizes the mean of a metric over micro-batches is its value on the
    union of those micro-batches. Reference log-probs passed to an objective without a
    preference term are ignored; an NLL with weight 0 is not computed.
    """
    objective = get_objective(config.mode)
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
    if objective.preference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(
            f"loss.mode={config.mode} needs reference log-probs (ref_chosen_logps and "
            "ref_rejected_logps); set reference.cache_path or use loss.mode=sft"
        )
    with_nll = objective.scores_nll(config.nll_weight)
    if with_nll and (nll_sum is None or nll_count is None):
        raise ValueError(f"loss.mode={config.mode} with loss.nll_weight={config.nll_weight} needs nll_sum and nll_count")

    f64 = torch.float64
    pw, pl = policy_chosen_logps.to(f64), policy_rejected_logps.to(f64)
    metrics: dict[str, torch.Tensor] = {}
    loss = pw.new_zeros(())
    if with_nll:
        nll = nll_term(nll_sum, nll_count, config.nll_reduction, token_normalizer)
        metrics["nll_loss"] = nll
        loss = loss + config.nll_weight * nll
    if objective.preference:
        rw, rl = ref_chosen_logps.to(f64), ref_rejected_logps.to(f64)
        chosen_rewards = config.beta * (pw - rw)  # [B]
        rejected_rewards = config.beta * (pl - rl)  # [B]
        pref = -F.logsigmoid(chosen_rewards - rejected_rewards)  # [B]
        pref_loss = pref.mean()
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
    return loss, {k: metrics[k].detach().clone() for k in objective.metric_names(config.nll_weight)}
