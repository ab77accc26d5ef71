"""The preference-loss family: pure functions of per-sequence log-probs, one entry point.

Every loss takes `(B,)` tensors of *summed* log-probs, log π(y|x) = Σ_t log π(y_t|x, y_<t) over
the response tokens, for the policy π and the frozen reference π_ref, on the chosen (y⁺) and
rejected (y⁻) response of each pair (`Scores`), and returns per-pair losses `(B,)`; the caller
takes the mean. Most are written in the difference of implicit rewards (DPO paper, §4,
r(x, y) = β·log π/π_ref):

    Δ = (log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x))

Direct Preference Optimization needs no reward model and no RL rollouts: the Bradley–Terry
likelihood of the human preference, written with the policy's own implicit reward, is the loss.

The family, one module each, and `LOSSES` (`dpo.loss.table`), the table of names that `dpo_loss`
reads:

- `dpo.loss.delta`: functions of Δ — sigmoid (DPO, cDPO), robust, exo_pair, discopop,
  sigmoid_norm, ipo, hinge, aot, aot_unpaired;
- `dpo.loss.anchored`: a term on each response's own log-ratio — nca_pair, bco_pair, sppo_hard,
  apo_zero, apo_down;
- `dpo.loss.reference_free`: no reference model — simpo, sft, orpo;
- `dpo.loss.unpaired`: one labelled completion per row, not a pair — kto.

Several types with weights make a mixture (MPO): the weighted sum of their losses. Two variants
change what every loss reads (`dpo.loss.variants`): WPO's per-pair weights (`pair_weights`) and
LD-DPO's length-desensitised log-probs (computed by the forward, `ld_alpha`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from dpo.loss.anchored import BCOBaseline
from dpo.loss.checks import check_loss_options
from dpo.loss.scores import LossOptions, Scores
from dpo.loss.table import LOSS_TYPES, LOSSES, as_list, is_unpaired, needs_reference

__all__ = ["BCOBaseline", "LOSSES", "LOSS_TYPES", "LossOptions", "Scores", "check_loss_options",
           "dpo_loss", "is_unpaired", "needs_reference"]




def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.0,
    discopop_tau: float = 0.05,
    bco_delta: torch.Tensor | float = 0.0,
    num_tokens: torch.Tensor | float | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    pair_weights: torch.Tensor | None = None,
    sft_chosen_logps: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    kl: torch.Tensor | float = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    return_terms: bool = False,
):
    """Per-pair preference losses and the (detached) implicit rewards.

    `loss_type` names one loss of `LOSSES` (formula and paper in each function's docstring), or
    several, whose losses are summed with `loss_weights` (default 1 each): a mixture (MPO).

    Args:
        policy_chosen_logps, policy_rejected_logps: `(B,)` summed log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: `(B,)` the same under the reference (None when
            every loss is reference-free).
        beta: β > 0, the strength of the KL penalty that keeps π near π_ref (inverse temperature).
        label_smoothing: ε, for the losses that take it; None for each loss's default (0; EXO:
            1e-3).
        chosen_lengths, rejected_lengths: `(B,)` response token counts (the losses marked
            `lengths`); positive, which the data pipeline guarantees.
        simpo_gamma: γ for ``simpo``. discopop_tau: τ for ``discopop``.
        bco_delta: δ for ``bco_pair`` (see `BCOBaseline`).
        num_tokens: the token-mean denominator of ``sft`` and orpo's NLL (`reference_free.sft`).
        f_divergence_type, f_alpha_divergence_coef: the divergence whose score difference the
            losses marked `f_divergence` push up (`delta.score_difference`); reverse_kl is DPO's.
        pair_weights: `(B,)` WPO's weights (`variants.wpo_weights`), multiplying each pair's
            loss, every term of a mixture alike (as TRL weights the summed loss); refused with
            aot/aot_unpaired, whose pairs share one sorted loss. None: 1.
        sft_chosen_logps: `(B,)` the chosen responses' plain summed log-probs, which ``sft``
            reads when the `policy_*_logps` are LD-DPO's (`variants.length_desensitised`):
            its NLL is of the whole response. None: `policy_chosen_logps`.
        labels, kl, desirable_weight, undesirable_weight: ``kto``'s, on unpaired rows: `(B,)`
            bool, true for a desirable completion (the `chosen` slot; the `rejected` slot holds
            the mismatched completions), the detached KL estimate z₀ and the classes' weights.
        return_terms: also return `{type: (B,) unweighted losses}` (before `loss_weights` and
            `pair_weights`).

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each `(B,)` (and the terms if asked).
        Rewards are β·(log π − log π_ref) — when no loss reads the reference, SimPO's (and TRL's
        ORPO's) β·log π/|y| — and detached: they are metrics, not loss terms.
    """
    types = as_list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    check_loss_options(beta=beta, loss_type=types, loss_weights=weights,
                       label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                       discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
                       f_alpha_divergence_coef=f_alpha_divergence_coef,
                       use_weighting=pair_weights is not None, desirable_weight=desirable_weight,
                       undesirable_weight=undesirable_weight)
    scores = Scores(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, chosen_lengths, rejected_lengths, sft_chosen_logps,
                    labels)
    _check_tensors(scores, types)
    terms = {}
    for name in types:
        options = LossOptions(beta, _smoothing(name, label_smoothing), simpo_gamma, discopop_tau,
                              bco_delta, num_tokens, f_divergence_type, f_alpha_divergence_coef,
                              kl, desirable_weight, undesirable_weight)
        terms[name] = LOSSES[name].fn(scores, options)  # (B,)
    losses = sum(w * terms[name] for name, w in zip(types, weights))  # (B,)
    if pair_weights is not None:
        losses = losses * pair_weights
    if needs_reference(types):
        chosen_rewards, rejected_rewards = scores.chosen_logratios, scores.rejected_logratios
    else:
        chosen_rewards = scores.policy_chosen / scores.chosen_lengths
        rejected_rewards = scores.policy_rejected / scores.rejected_lengths
    rewards = ((beta * chosen_rewards).detach(), (beta * rejected_rewards).detach())
    return (losses, *rewards, terms) if return_terms else (losses, *rewards)


def _smoothing(name: str, label_smoothing: float | None) -> float:
    spec = LOSSES[name]
    if spec.smoothing is None:
        return 0.0
    return spec.default_smoothing if label_smoothing is None else label_smoothing


def _check_tensors(scores: Scores, types: list[str]) -> None:
    """Raise ValueError naming the missing or misshapen tensor. Checks shapes only: looking at
    tensor values would force a device sync on every step."""
    names = ["policy_chosen", "policy_rejected"]
    if needs_reference(types):
        names += ["ref_chosen", "ref_rejected"]
    if any(LOSSES[t].lengths for t in types):
        names += ["chosen_lengths", "rejected_lengths"]
    if is_unpaired(types):
        names += ["labels"]
    for name in names:
        if getattr(scores, name) is None:
            why = ("loss_type " + ", ".join(t for t in types if LOSSES[t].lengths)
                   + " normalises by response length" if name.endswith("lengths")
                   else "loss_type kto trains on labelled completions" if name == "labels"
                   else "the reference log-probs are needed")
            raise ValueError(f"{_arg(name)} is required: {why}")
    shape = scores.policy_chosen.shape
    if len(shape) != 1:
        raise ValueError(f"policy_chosen_logps must have shape (B,), got {tuple(shape)}")
    for name in names:
        if getattr(scores, name).shape != shape:
            raise ValueError(f"{_arg(name)} has shape {tuple(getattr(scores, name).shape)}, "
                             f"expected {tuple(shape)} like policy_chosen_logps")
    if scores.labels is not None and scores.labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor (True = desirable), got "
                         f"{scores.labels.dtype}")


def _arg(name: str) -> str:
    """The `dpo_loss` argument that holds the `Scores` field `name`."""
    return name if name.endswith("lengths") or name == "labels" else f"{name}_logps"
