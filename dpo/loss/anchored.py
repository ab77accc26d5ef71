"""Losses of each response's own log-ratio: anchored to the reference, not only to each other.

The Δ family only sees the difference of the two rewards, so both log-probs may fall as long as
the rejected one falls faster. These losses put a term on each response, which says where its
reward should go on its own: up for the chosen, down for the rejected (NCA, BCO, SPPO), or, for
APO, in the direction the data's quality relative to the model calls for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo.loss.scores import LossOptions, Scores


def nca_pair(s: Scores, o: LossOptions) -> torch.Tensor:
    """NCA, pairwise (Chen et al. 2024, arXiv:2402.05369): noise-contrastive alignment, which
    raises the chosen reward r⁺ = β·log π/π_ref(y⁺) in absolute terms, not only against r⁻:

        L = −log σ(r⁺) − ½·log σ(−r⁺) − ½·log σ(−r⁻)
    """
    chosen, rejected = o.beta * s.chosen_logratios, o.beta * s.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def bco_pair(s: Scores, o: LossOptions) -> torch.Tensor:
    """BCO, pairwise (Jung et al. 2024, arXiv:2404.04656): each response is classified on its own
    as good or bad by its reward, against a baseline δ, the running mean of the rewards
    (`BCOBaseline`; δ = 0 with `--bco-baseline none`, TRL 1.16's form):

        L = −log σ(r⁺ − δ) − log σ(−(r⁻ − δ)),   r = β·log π/π_ref(y)
    """
    chosen, rejected = o.beta * s.chosen_logratios, o.beta * s.rejected_logratios
    return -F.logsigmoid(chosen - o.bco_delta) - F.logsigmoid(-(rejected - o.bco_delta))


def sppo_hard(s: Scores, o: LossOptions) -> torch.Tensor:
    """SPPO, hard labels (Wu et al. 2024, arXiv:2405.00675): self-play preference optimisation
    with win probability 1 for the chosen and 0 for the rejected response, which regresses each
    log-ratio to ±1/(2β):

        L = (log π/π_ref(y⁺) − 1/(2β))² + (log π/π_ref(y⁻) + 1/(2β))²
    """
    return ((s.chosen_logratios - 0.5 / o.beta) ** 2
            + (s.rejected_logratios + 0.5 / o.beta) ** 2)


def apo_zero(s: Scores, o: LossOptions) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7), for chosen responses better
    than the model's own: raise the chosen likelihood, lower the rejected one.

        L = (1 − σ(r⁺)) + σ(r⁻),   r = β·log π/π_ref(y)
    """
    return (1 - torch.sigmoid(o.beta * s.chosen_logratios)
            + torch.sigmoid(o.beta * s.rejected_logratios))


def apo_down(s: Scores, o: LossOptions) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8), for chosen responses worse
    than the model's own: lower both likelihoods, the rejected one more.

        L = σ(r⁺) + (1 − σ(βΔ))
    """
    return (torch.sigmoid(o.beta * s.chosen_logratios)
            + 1 - torch.sigmoid(o.beta * s.delta))


class BCOBaseline:
    """BCO's δ: the mean of every implicit reward (chosen and rejected) trained on so far.

    Updated once per optimizer step with the rewards of all its micro-batches on all processes,
    so that every micro-batch of a step uses the same δ (the value before the step) and the
    step's gradient does not depend on how it is split into micro-batches and processes. It
    starts at 0, which is also the rewards' value at step 0 (the policy is the reference).
    `state_dict`/`load_state_dict` put it in checkpoints (`accelerator.register_for_checkpointing`).
    """

    def __init__(self):
        self.mean, self.count = 0.0, 0
        self._sum = self._n = 0.0  # this process's rewards since the last update

    def add(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        self._sum = self._sum + (chosen_rewards.sum() + rejected_rewards.sum()).detach().float()
        self._n += 2 * chosen_rewards.numel()

    def update(self, accelerator) -> None:
        """Fold in the step's rewards from every process (one all-reduce)."""
        device = accelerator.device
        pending = torch.stack([torch.as_tensor(self._sum, device=device, dtype=torch.float64),
                               torch.tensor(self._n, device=device, dtype=torch.float64)])
        total, n = accelerator.reduce(pending, reduction="sum").tolist()
        if n:
            self.mean = (self.mean * self.count + total) / (self.count + n)
            self.count += int(n)
        self._sum = self._n = 0.0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
