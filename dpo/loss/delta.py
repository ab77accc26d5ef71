"""Losses of the score difference Δ: the Bradley–Terry family and its relatives.

Each is a function of Δ = (log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻)) alone (or of
its per-token form Δ̄), pushing the chosen response's implicit reward above the rejected one's.
Δ is the score difference of the reverse KL that DPO regularises with; sigmoid, robust, exo_pair,
discopop and hinge also take that of another f-divergence (`score_difference`).
They differ in how hard they push a pair that is already ranked right: the logistic loss ever
more gently, IPO's square not past a target margin, the hinge not at all past a margin of 1/β.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpo.loss.scores import LossOptions, Scores


# f'(u) of each divergence, u = π/π_ref, written in the log-ratio l = log u (f-DPO, Wang et al.
# 2024, arXiv:2309.16240, Table 1); `score_difference` is f'(u⁺) − f'(u⁻).
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def score_difference(s: Scores, o: LossOptions) -> torch.Tensor:
    """The score difference the losses of this module push up: Δ for the reverse KL that DPO is
    built on (`--f-divergence-type reverse_kl`, the default); for another f-divergence f between
    π and π_ref (f-DPO, Wang et al. 2024, arXiv:2309.16240, Thm. 1), f'(u⁺) − f'(u⁻) with
    u = π/π_ref, up to the constant factor β and terms that cancel:

        reverse_kl         f'(u) = log u + 1            Δ = l⁺ − l⁻
        forward_kl         f'(u) = −1/u                 Δ = e^(−l⁻) − e^(−l⁺)
        js_divergence      f'(u) = log(2u/(1+u))        Δ = l⁺ − l⁻ − (softplus(l⁺) − softplus(l⁻))
        alpha_divergence   f'(u) = (1 − u^(−α))/α       Δ = (e^(−α·l⁻) − e^(−α·l⁺))/α,  α = coef

    l⁺, l⁻ are the log-ratios log π/π_ref of y⁺, y⁻. All four are 0 at π = π_ref and increase
    with l⁺ and decrease with l⁻; the exponentials are capped below overflow.
    """
    chosen, rejected = s.chosen_logratios, s.rejected_logratios
    kind = o.f_divergence_type
    if kind == "reverse_kl":
        return chosen - rejected
    if kind == "js_divergence":
        return chosen - rejected - (F.softplus(chosen) - F.softplus(rejected))
    alpha = 1.0 if kind == "forward_kl" else o.f_alpha_divergence_coef
    return (_capped_exp(-alpha * rejected) - _capped_exp(-alpha * chosen)) / alpha


def _capped_exp(x: torch.Tensor) -> torch.Tensor:
    # One below the largest exponent, so that rounding cannot reach inf either.
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max) - 1))


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the logistic loss with labels flipped with probability ε."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid(s: Scores, o: LossOptions) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7); with ε > 0 conservative DPO (cDPO,
    Mitchell 2023), which assumes each label is flipped with probability ε:

        L = −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)              ε ∈ [0, 0.5]
    """
    return _smoothed_logistic(o.beta * score_difference(s, o), o.label_smoothing)


def robust(s: Scores, o: LossOptions) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409, Eq. 7), an unbiased estimate of the
    clean-label loss under label noise ε:

        L = [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε)   ε ∈ [0, 0.5)
    """
    eps, z = o.label_smoothing, o.beta * score_difference(s, o)
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def exo_pair(s: Scores, o: LossOptions) -> torch.Tensor:
    """EXO (Ji et al. 2024, arXiv:2402.00856, pairwise form): the reverse KL from the model's
    preference p = σ(βΔ) to the labels smoothed by ε (ε = 0 would make it infinite):

        L = σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε)   ε ∈ (0, 0.5)
    """
    eps, z = o.label_smoothing, o.beta * score_difference(s, o)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def discopop(s: Scores, o: LossOptions) -> torch.Tensor:
    """DiscoPOP (Lu et al. 2024, arXiv:2406.08414, Eq. 5; "log-ratio modulated loss"), found by
    LLM-driven search: a blend of the logistic and the exponential loss, weighted by σ(βΔ/τ):

        L = (1 − σ(βΔ/τ))·(−log σ(βΔ)) + σ(βΔ/τ)·exp(−βΔ)          τ = `discopop_tau`
    """
    z = o.beta * score_difference(s, o)
    modulation = torch.sigmoid(z / o.discopop_tau)
    return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation


def sigmoid_norm(s: Scores, o: LossOptions) -> torch.Tensor:
    """DPO on per-token log-ratios (length-normalised DPO, as TRL's ``sigmoid_norm``): a long
    response no longer weighs more for being long. Needs the token counts.

        L = −log σ(βΔ̄),   Δ̄ = (log π/π_ref)(y⁺)/|y⁺| − (log π/π_ref)(y⁻)/|y⁻|
    """
    return -F.logsigmoid(o.beta * s.delta_per_token)


def ipo(s: Scores, o: LossOptions) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17), a squared loss that regresses the
    per-token margin to 1/(2β) instead of pushing it to infinity. Needs the token counts.

        L = (Δ̄ − 1/(2β))²
    """
    return (s.delta_per_token - 1 / (2 * o.beta)) ** 2


def hinge(s: Scores, o: LossOptions) -> torch.Tensor:
    """SLiC-HF (Zhao et al. 2023, arXiv:2305.10425) as used by RSO (Liu et al. 2023,
    arXiv:2309.06657): no push at all once βΔ ≥ 1.

        L = max(0, 1 − βΔ)
    """
    return torch.relu(1 - o.beta * score_difference(s, o))


def aot(s: Scores, o: LossOptions) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): distributional alignment by optimal
    transport. The policy's log-ratios log π(y⁺) − log π(y⁻) and the reference's are each sorted
    over the micro-batch, and the i-th smallest of one is compared with the i-th of the other:

        L_i = −(1−ε)·log σ(β·d_i) − ε·log σ(−β·d_i),
        d = sort(log π(y⁺) − log π(y⁻)) − sort(log π_ref(y⁺) − log π_ref(y⁻))

    The sort couples the pairs of a micro-batch, so 4 micro-batches of 1 pair do not give the
    loss of 1 micro-batch of 4: AOT is exempt from accumulation equivalence.
    """
    policy, _ = torch.sort(s.policy_chosen - s.policy_rejected, dim=0)
    reference, _ = torch.sort(s.ref_chosen - s.ref_rejected, dim=0)
    return _smoothed_logistic(o.beta * (policy - reference), o.label_smoothing)


def aot_unpaired(s: Scores, o: LossOptions) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): the chosen and the rejected
    log-ratios are sorted separately, so the i-th smallest chosen reward is pushed above the
    i-th smallest rejected one, whichever pairs they come from:

        L_i = −(1−ε)·log σ(β·d_i) − ε·log σ(−β·d_i),
        d = sort(log π/π_ref (y⁺)) − sort(log π/π_ref (y⁻))

    Exempt from accumulation equivalence, as ``aot``.
    """
    chosen, _ = torch.sort(s.chosen_logratios, dim=0)
    rejected, _ = torch.sort(s.rejected_logratios, dim=0)
    return _smoothed_logistic(o.beta * (chosen - rejected), o.label_smoothing)
