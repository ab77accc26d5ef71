"""`check_loss_options`: every loss configuration `dpo_loss` refuses, one line naming the
parameter; the config runs it before anything loads."""
from __future__ import annotations

from collections.abc import Sequence

from dpo.loss import delta
from dpo.loss.table import LOSS_TYPES, LOSSES, as_list


def check_loss_options(
    *, beta: float, loss_type: str | Sequence[str], loss_weights: Sequence[float] | None = None,
    label_smoothing: float | None = None, simpo_gamma: float = 0.0, discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False, ld_alpha: float | None = None, desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> None:
    """Raise ValueError, naming the parameter, for a loss configuration `dpo_loss` rejects."""
    types = as_list(loss_type)
    for name in types:
        if name not in LOSSES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {name!r}")
    _check_unpaired(types, use_weighting, ld_alpha, desirable_weight, undesirable_weight)
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


def _check_unpaired(types: list[str], use_weighting: bool, ld_alpha: float | None,
                    desirable_weight: float, undesirable_weight: float) -> None:
    """KTO reads rows of one labelled completion each: nothing that reads a pair goes with it."""
    unpaired = [t for t in types if LOSSES[t].unpaired]
    for name, weight in (("desirable_weight", desirable_weight),
                         ("undesirable_weight", undesirable_weight)):
        if not 0 < weight < float("inf"):
            raise ValueError(f"{name} must be finite and > 0, got {weight!r}")
    if not unpaired:
        return
    if len(types) > 1:
        raise ValueError(f"loss_type {unpaired[0]} trains on unpaired rows (one labelled "
                         f"completion each) and {', '.join(t for t in types if t != unpaired[0])} "
                         "on pairs: it stands alone")
    if use_weighting:
        raise ValueError(f"use_weighting: WPO weights pairs, and loss_type {unpaired[0]} has none")
    if ld_alpha is not None:
        raise ValueError(f"ld_alpha: LD-DPO shortens a pair's longer response, and loss_type "
                         f"{unpaired[0]} has no pairs")


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
