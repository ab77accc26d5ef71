"""What every loss is written in: the per-sequence log-probs of a batch of pairs, and the options.

All tensors are `(B,)`, one value per pair: *summed* log-probs log π(y|x) = Σ_t log π(y_t|x, y_<t)
over the response tokens, for the policy π and the frozen reference π_ref, on the chosen (y⁺) and
rejected (y⁻) response, and the responses' token counts |y⁺|, |y⁻|.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scores:
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None  # None for a reference-free loss
    ref_rejected: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None  # needed by the length-normalised losses
    rejected_lengths: torch.Tensor | None = None
    # The chosen's plain log-probs when policy_chosen are LD-DPO's (`sft` reads them); None: same
    sft_chosen: torch.Tensor | None = None
    # Unpaired rows (KTO): True where the `chosen` slot's completion is desirable; the
    # `rejected` slot then holds the mismatched completion of the KL estimate.
    labels: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        """log π(y⁺|x) − log π_ref(y⁺|x): the chosen response's implicit reward, over β."""
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def delta(self) -> torch.Tensor:
        """Δ, the difference of implicit rewards over β (DPO paper, §4)."""
        return self.chosen_logratios - self.rejected_logratios

    @property
    def delta_per_token(self) -> torch.Tensor:
        """Δ̄: Δ with each log-ratio divided by its response's token count."""
        return (self.chosen_logratios / self.chosen_lengths
                - self.rejected_logratios / self.rejected_lengths)


@dataclass(frozen=True)
class LossOptions:
    beta: float
    label_smoothing: float = 0.0  # ε: the loss's own default already filled in
    simpo_gamma: float = 0.0
    discopop_tau: float = 0.05
    bco_delta: torch.Tensor | float = 0.0  # BCO's baseline δ (`BCOBaseline`)
    # The denominator of a token mean (`sft`): the optimizer step's chosen tokens per micro-batch,
    # None for this batch's own.
    num_tokens: torch.Tensor | float | None = None
    f_divergence_type: str = "reverse_kl"  # the divergence behind the score difference
    f_alpha_divergence_coef: float = 0.5
    # KTO: the reference point z₀ (detached) and the weights of the two classes
    kl: torch.Tensor | float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
