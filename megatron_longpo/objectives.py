"""The training objectives (``loss.mode``) as one registry: what each one needs and computes.

Torch-free declarations, so config validation, the data provider, preflight and the reference
source ask the same table (``get_objective(cfg.loss.mode)``) instead of testing mode names; the
math is :func:`megatron_longpo.loss.longpo.longpo_loss`, which reads the same declaration.

Terms (docs/loss.md):
- ``nll``: ``nll_weight`` x the NLL of one sequence of the pair (``nll_on``: the chosen S_w or the
  rejected S_l; ``loss.nll_target`` picks the whole sequence or its responses);
- ``preference``: ``lam`` x mean_b -log sigmoid(beta ((P_w - R_w) - (P_l - R_l))), with R from
  the reference on the SHORT context (LongPO's short-to-long constraint) or on the LONG one (DPO).

The paper's Figure 4 arms: ``longpo``, ``dpo``, ``sft`` (SFT-Chosen), ``sft_rejected``
(SFT-Rejected). "SFT-Chosen + short-to-long constraint" is not offered: the paper does not give
its formula (docs/loss.md says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

# Every metric an objective may log (TRL DPOTrainer names), in logging order.
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
# Metrics of the preference term (they need reference log-probs).
REFERENCE_METRICS = (
    "pref_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/ref_chosen",
    "logps/ref_rejected",
)
# Response log-prob sums P_w / P_l: cheap (response tokens only), logged by every objective.
RESPONSE_METRICS = ("logps/chosen", "logps/rejected")

ReferenceKind = Literal["short", "long"]


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    reference: Optional[ReferenceKind]  # whose log-probs R_w / R_l: short context, long context, none
    preference: bool  # has the lam * preference term
    nll_on: Optional[Literal["chosen", "rejected"]]  # which sequence the NLL term is on

    @property
    def needs_reference(self) -> bool:
        return self.reference is not None

    @property
    def reference_mode(self) -> Optional[str]:
        """The reference cache mode that holds R (tools/precompute_reference.py --mode): ``longpo``
        (short contexts per turn, the paper's reference) or ``dpo`` (the long sequences)."""
        return {"short": "longpo", "long": "dpo", None: None}[self.reference]

    def terms(self, nll_weight: float) -> tuple[str, ...]:
        """The loss terms that contribute (a zero-weight NLL is no term)."""
        return tuple(t for t, on in (("nll", self.nll_on is not None and nll_weight > 0), ("preference", self.preference))
                     if on)

    def scores_nll(self, nll_weight: float) -> bool:
        """Whether the policy's NLL segment (``PairBatch.nll_segment``) is scored at all."""
        return "nll" in self.terms(nll_weight)

    def metric_names(self, nll_weight: float) -> tuple[str, ...]:
        """What :func:`longpo_loss` returns, in :data:`METRIC_NAMES` order."""
        names = {"loss", *RESPONSE_METRICS}
        if self.scores_nll(nll_weight):
            names.add("nll_loss")
        if self.preference:
            names.update(REFERENCE_METRICS)
        return tuple(k for k in METRIC_NAMES if k in names)


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("longpo", "NLL(chosen) + lam * preference, reference on the short context (LongPO)",
                  reference="short", preference=True, nll_on="chosen"),
        Objective("dpo", "NLL(chosen) + lam * preference, reference on the long context (DPO)",
                  reference="long", preference=True, nll_on="chosen"),
        Objective("sft", "NLL of the chosen sequence only (SFT-Chosen)", reference=None, preference=False,
                  nll_on="chosen"),
        Objective("sft_rejected", "NLL of the rejected sequence only (SFT-Rejected)", reference=None,
                  preference=False, nll_on="rejected"),
    )
}
OBJECTIVE_NAMES = tuple(OBJECTIVES)


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"loss.mode={name!r} is not an objective; choose from {list(OBJECTIVE_NAMES)}")
    return OBJECTIVES[name]
