"""The preference-loss family: pure functions of per-sequence log-probs, one entry point.

Every loss takes `(B,)` tensors of *summed* log-probs, log π(y|x) = Σ_t log π(y_t|x, y_<t) over
the response tokens, for the policy π and the frozen reference π_ref, on the chosen (y⁺) and
rejected (y⁻) response of each pair (`Scores`), and returns per-pair losses `(B,)`; the caller
takes the mean. Most are written in the difference of implicit rewards (DPO paper, §4,
r(x, y) = β·log π/π_ref):

    Δ = (log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x))

Direct Preference Optimization needs no reward model and no RL rollouts: the Bradley–Terry
likelihood of the human preference, written with the policy's own implicit reward, is the loss.

The family, one module each, and `LOSSES`, the table of names that `dpo_loss` reads:

- `dpo.loss.delta`: functions of Δ — sigmoid (DPO, cDPO), robust, exo_pair, discopop,
  sigmoid_norm, ipo, hinge, aot, aot_unpaired;
- `dpo.loss.anchored`: a term on each response's own log-ratio — nca_pair, bco_pair, sppo_hard,
  apo_zero, apo_down;
- `dpo.loss.reference_free`: no reference model — simpo, sft, orpo.

Several types with weights make a mixture (MPO): the weighted sum of their losses. Two variants
change what every loss reads (`dpo.loss.variants`): WPO's per-pair weights (`pair_weights`) and
LD-DPO's length-desensitised log-probs (computed by the forward, `ld_alpha`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from dpo.loss import anchored, delta, reference_free
from dpo.loss.anchored import BCOBaseline
from dpo.loss.scores import LossOptions, Scores

__all__ = ["BCOBaseline", "LOSSES", "LOSS_TYPES", "LossOptions", "Scores", "check_loss_options",
           "dpo_loss", "needs_reference"]


@dataclass(frozen=True)
class Loss:
    """One entry of the table: the function, what it reads, and the label smoothing it takes."""

    fn: Callable[[Scores, LossOptions], torch.Tensor]
    reference: bool = True  # reads π_ref's log-probs
    lengths: bool = False  # reads the token counts
    # Label smoothing ε: (low, high, closed at high) it may take, and its value when unset;
    # None: the loss has none.
    smoothing: tuple[float, float, bool] | None = None
    default_smoothing: float = 0.0
    f_divergence: bool = False  # written in the score difference, so any f-divergence's
    per_token: bool = False  # divides each log-prob by its length (no LD-DPO on top)
    num_tokens: bool = False  # a token mean: reads the denominator `num_tokens` (sft's NLL)


LOSSES = {
    "sigmoid": Loss(delta.sigmoid, smoothing=(0.0, 0.5, True), f_divergence=True),
    "robust": Loss(delta.robust, smoothing=(0.0, 0.5, False), f_divergence=True),
    "exo_pair": Loss(delta.exo_pair, smoothing=(0.0, 0.5, False), default_smoothing=1e-3,
                     f_divergence=True),
    "discopop": Loss(delta.discopop, f_divergence=True),
    "sigmoid_norm": Loss(delta.sigmoid_norm, lengths=True, per_token=True),
    "ipo": Loss(delta.ipo, lengths=True, per_token=True),
    "hinge": Loss(delta.hinge, f_divergence=True),
    "aot": Loss(delta.aot, smoothing=(0.0, 0.5, True)),
    "aot_unpaired": Loss(delta.aot_unpaired, smoothing=(0.0, 0.5, True)),
    "nca_pair": Loss(anchored.nca_pair),
    "bco_pair": Loss(anchored.bco_pair),
    "sppo_hard": Loss(anchored.sppo_hard),
    "apo_zero": Loss(anchored.apo_zero),
    "apo_down": Loss(anchored.apo_down),
    "simpo": Loss(reference_free.simpo, reference=False, lengths=True, per_token=True),
    "sft": Loss(reference_free.sft, reference=False, lengths=True, num_tokens=True),
    "orpo": Loss(reference_free.orpo, reference=False, lengths=True, per_token=True,
                 num_tokens=True),
}
LOSS_TYPES = tuple(LOSSES)


def needs_reference(loss_types: str | Sequence[str]) -> bool:
    """Whether a loss (or any loss of a mixture) reads the reference model's log-probs."""
    return any(LOSSES[t].reference for t in _as_list(loss_types))


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
        return_terms: also return `{type: (B,) unweighted losses}` (before `loss_weights` and
            `pair_weights`).

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each `(B,)` (and the terms if asked).
        Rewards are β·(log π − log π_ref) — when no loss reads the reference, SimPO's (and TRL's
        ORPO's) β·log π/|y| — and detached: they are metrics, not loss terms.
    """
    types = _as_list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    check_loss_options(beta=beta, loss_type=types, loss_weights=weights,
                       label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                       discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
                       f_alpha_divergence_coef=f_alpha_divergence_coef,
                       use_weighting=pair_weights is not None)
    scores = Scores(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, chosen_lengths, rejected_lengths, sft_chosen_logps)
    _check_tensors(scores, types)
    terms = {}
    for name in types:
        options = LossOptions(beta, _smoothing(name, label_smoothing), simpo_gamma, discopop_tau,
                              bco_delta, num_tokens, f_divergence_type, f_alpha_divergence_coef)
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


def check_loss_options(
    *, beta: float, loss_type: str | Sequence[str], loss_weights: Sequence[float] | None = None,
    label_smoothing: float | None = None, simpo_gamma: float = 0.0, discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False, ld_alpha: float | None = None,
) -> None:
    """Raise ValueError, naming the parameter, for a loss configuration `dpo_loss` rejects."""
    types = _as_list(loss_type)
    for name in types:
        if name not in LOSSES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {name!r}")
    if len(set(types)) < len(types):
        raise ValueError(f"loss_type lists a type twice: {types}; give each once, with its "
                         "weight in loss_weights")
    if {"orpo", "sft"} <= set(types):
        raise ValueError("loss_type orpo has the chosen responses' NLL (sft) in it already; drop "
                         "sft (or rpo_alpha, which adds it)")
    if loss_weights is not None:
        if len(loss_weights) != len(types):
            raise ValueError(f"loss_weights: {len(loss_weights)} weights for {len(types)} loss "
                             f"types ({', '.join(types)}); give one for each")
        if not all(w > 0 and w != float("inf") for w in loss_weights):
            raise ValueError(f"loss_weights must be finite and > 0, got {list(loss_weights)}")
    if not beta > 0 or beta == float("inf"):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if label_smoothing is not None:
        takes = [t for t in types if LOSSES[t].smoothing is not None]
        if not takes and label_smoothing != 0:
            raise ValueError(f"label_smoothing: loss_type {', '.join(types)} has none (it is "
                             f"taken by {', '.join(t for t in LOSSES if LOSSES[t].smoothing)})")
        for name in takes:
            low, high, closed = LOSSES[name].smoothing
            ok = (low <= label_smoothing <= high if closed else low <= label_smoothing < high)
            if name == "exo_pair":  # ε = 0 makes EXO's log ε infinite
                ok = ok and label_smoothing > 0
            if not ok:
                opening, closing = "(" if name == "exo_pair" else "[", "]" if closed else ")"
                bounds = f"{opening}{low}, {high}{closing}"
                raise ValueError(f"label_smoothing for loss_type={name!r} must lie in {bounds}, "
                                 f"got {label_smoothing!r}")
    if simpo_gamma != 0 and "simpo" not in types:
        raise ValueError(f"simpo_gamma is used by loss_type='simpo' only, got {simpo_gamma!r} "
                         f"with loss_type={', '.join(types)}")
    if not discopop_tau > 0 or discopop_tau == float("inf"):
        raise ValueError(f"discopop_tau must be a finite number > 0, got {discopop_tau!r}")
    if f_divergence_type not in delta.F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {delta.F_DIVERGENCES}, got "
                         f"{f_divergence_type!r}")
    if f_divergence_type != "reverse_kl":
        _check_f_divergence(types, f_divergence_type)
    if not f_alpha_divergence_coef > 0 or f_alpha_divergence_coef == float("inf"):
        raise ValueError("f_alpha_divergence_coef must be a finite number > 0, got "
                         f"{f_alpha_divergence_coef!r}")
    sorting = [t for t in types if t in ("aot", "aot_unpaired")]
    if use_weighting and sorting:
        raise ValueError(f"use_weighting: loss_type {', '.join(sorting)} sorts the margins "
                         "across the micro-batch, so no pair has a loss of its own to weight")
    if ld_alpha is not None:
        per_token = [t for t in types if LOSSES[t].per_token]
        if not 0 <= ld_alpha <= 1:
            raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha!r}")
        if per_token:
            raise ValueError(f"ld_alpha: loss_type {', '.join(per_token)} divides each log-prob "
                             "by its length, a length correction of its own; LD-DPO is for "
                             "the summed log-probs")
        if set(types) == {"sft"}:
            raise ValueError("ld_alpha: loss_type sft has no preference term to desensitise "
                             "(its NLL reads the whole chosen response)")


def _check_f_divergence(types: list[str], kind: str) -> None:
    """Another divergence than the reverse KL changes the score difference (`delta.
    score_difference`), so it takes the losses written in it; `sft` reads no scores and may stand
    beside them (RPO), but not alone, where the divergence would change nothing."""
    takes = ", ".join(t for t in LOSSES if LOSSES[t].f_divergence)
    for name in types:
        if LOSSES[name].f_divergence or name == "sft":
            continue
        if not LOSSES[name].reference:
            why = "reads no reference model, so there is no divergence from it to change"
        elif LOSSES[name].per_token:
            # TRL 1.16 divides f'(u) by the length anyway.
            why = ("divides each response's score by its length, a per-token mean only for the "
                   "reverse KL's log-ratio: f'(u) of another divergence is not a sum over tokens")
        else:
            # f-DPO's reparameterisation leaves β·log Z(x), which cancels only in the difference.
            why = ("puts a term on each response's own log-ratio (or sorts them), and f-DPO's "
                   "reward holds only in the chosen-rejected difference")
        raise ValueError(f"f_divergence_type {kind}: loss_type {name} {why}; it is taken by "
                         f"{takes} (and sft beside them)")
    if set(types) == {"sft"}:
        raise ValueError(f"f_divergence_type {kind}: loss_type sft reads no scores, so the "
                         f"divergence would change nothing; it is taken by {takes}")


def _as_list(loss_type: str | Sequence[str]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


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
    for name in names:
        if getattr(scores, name) is None:
            arg = name if name.endswith("lengths") else f"{name}_logps"
            why = ("loss_type " + ", ".join(t for t in types if LOSSES[t].lengths)
                   + " normalises by response length" if name.endswith("lengths")
                   else "the reference log-probs are needed")
            raise ValueError(f"{arg} is required: {why}")
    shape = scores.policy_chosen.shape
    if len(shape) != 1:
        raise ValueError(f"policy_chosen_logps must have shape (B,), got {tuple(shape)}")
    for name in names:
        if getattr(scores, name).shape != shape:
            arg = name if name.endswith("lengths") else f"{name}_logps"
            raise ValueError(f"{arg} has shape {tuple(getattr(scores, name).shape)}, expected "
                             f"{tuple(shape)} like policy_chosen_logps")
