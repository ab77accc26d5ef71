"""Losses of unpaired feedback: each row is one response with a label, desirable or not.

KTO's rows have no second response to compare with. Its reference point is the policy's KL
divergence from the reference, which the caller estimates from mismatched (prompt, completion)
pairs of the batch (`dpo.train.step.kto_kl`) and passes, detached, as `LossOptions.kl`. The
`Scores` of an unpaired batch hold each row's completion in the `chosen` slot and its label in
`labels`; the `rejected` slot holds the mismatched completion the KL estimate was read from.
"""
from __future__ import annotations

import torch

from dpo.loss.scores import LossOptions, Scores


def kto(s: Scores, o: LossOptions) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7): prospect theory's value of each
    response's implicit reward r = log π(y|x) − log π_ref(y|x) against the reference point
    z₀ = KL(π‖π_ref) (`o.kl`, clamped at 0 and detached by the caller):

        L = λ_D·(1 − σ(β·(r − z₀)))   for a desirable y (label true)
        L = λ_U·(1 − σ(β·(z₀ − r)))   for an undesirable y

    λ_D, λ_U = `desirable_weight`, `undesirable_weight` (the paper's weights that offset an
    imbalance of the two classes: λ_D·n_D / (λ_U·n_U) in [1, 4/3] is its advice).
    """
    logratios = s.chosen_logratios
    desirable = 1 - torch.sigmoid(o.beta * (logratios - o.kl))
    undesirable = 1 - torch.sigmoid(o.beta * (o.kl - logratios))
    return torch.where(s.labels, o.desirable_weight * desirable,
                       o.undesirable_weight * undesirable)
