"""The DPO loss family: pure functions of per-sequence log-probs.

Every loss here takes four `(B,)` tensors of *summed* log-probs, log π(y|x) = Σ_t log π(y_t|x, y_<t)
over the response tokens, for the policy π and the frozen reference π_ref, on the chosen (y⁺) and
rejected (y⁻) response of each pair, and returns per-pair losses `(B,)`; the caller takes the mean.

The shared quantity is the difference of implicit rewards (DPO paper, §4, r(x, y) = β·log π/π_ref):

    Δ = (log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x))

Direct Preference Optimization needs no reward model and no RL rollouts: the Bradley–Terry
likelihood of the human preference, written with the policy's own implicit reward, is the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")
# Loss types that read the per-response token counts, and those that ignore the reference model.
LENGTH_NORMALISED = ("ipo", "simpo")
REFERENCE_FREE = ("simpo",)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and the (detached) implicit rewards.

    With Δ as in the module docstring, ε = `label_smoothing` and σ the logistic function:

    - ``sigmoid`` — DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7); with ε > 0 it is
      conservative DPO (cDPO, Mitchell 2023), which assumes each label is flipped with prob. ε:
          L = −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)              ε ∈ [0, 0.5]
    - ``robust`` — Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409, Eq. 7), an unbiased
      estimate of the clean-label loss under label noise ε:
          L = [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε)   ε ∈ [0, 0.5)
    - ``ipo`` — IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17), a squared loss that regresses the
      margin to 1/(2β) instead of pushing it to infinity. Δ̄ is Δ with each log-ratio divided by its
      response's token count, so `chosen_lengths` and `rejected_lengths` are required:
          L = (Δ̄ − 1/(2β))²
    - ``hinge`` — SLiC-HF (Zhao et al. 2023, arXiv:2305.10425) as used by RSO (Liu et al. 2023,
      arXiv:2309.06657):
          L = max(0, 1 − βΔ)
    - ``simpo`` — SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6), reference-free: the reference
      log-probs are ignored (pass None), the reward is the length-normalised policy log-prob, and
      γ = `simpo_gamma` is a target margin; the lengths are required:
          L = −log σ(β·(log π(y⁺|x)/|y⁺| − log π(y⁻|x)/|y⁻|) − γ)

    Args:
        policy_chosen_logps, policy_rejected_logps: `(B,)` summed log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: `(B,)` the same under the reference (None for simpo).
        beta: β > 0, the strength of the KL penalty that keeps π near π_ref (inverse temperature).
        loss_type: one of `LOSS_TYPES`.
        label_smoothing: ε for ``sigmoid`` and ``robust``; must be 0 for the others.
        chosen_lengths, rejected_lengths: `(B,)` response token counts (ipo, simpo); they must be
            positive, which the data pipeline guarantees (a row with an empty response is dropped).
        simpo_gamma: γ for ``simpo``; must be 0 for the others.

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each `(B,)`. Rewards are β·(log π − log π_ref)
        — for simpo, its own reward β·log π/|y| — and detached: they are metrics, not loss terms.
    """
    _check_args(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, simpo_gamma=simpo_gamma,
    )
    eps = label_smoothing

    if loss_type == "simpo":
        chosen_rewards = beta * policy_chosen_logps / chosen_lengths
        rejected_rewards = beta * policy_rejected_logps / rejected_lengths
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma)
        return losses, chosen_rewards.detach(), rejected_rewards.detach()

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,) log π/π_ref on y⁺
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,) on y⁻
    delta = chosen_logratios - rejected_logratios  # (B,)

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta)
                  + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo
        delta_per_token = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        losses = (delta_per_token - 1 / (2 * beta)) ** 2

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor,
                    num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the chosen responses, per token: the RPO term.

    RPO (Pang et al. 2024, arXiv:2404.19733, Eq. 3) adds α·NLL(y⁺) to the DPO loss so that the
    chosen response's likelihood does not fall while the margin grows. The token-mean NLL over the
    batch needs only what the concatenated forward already returns — summed log-probs and token
    counts — because −Σ_i Σ_t log π(y⁺_it) / Σ_i |y⁺_i| = −Σ_i logps_i / Σ_i lengths_i.

    `num_tokens` replaces this batch's Σ_i |y⁺_i| as the denominator. A training step averages the
    losses of its micro-batches (accumulation, processes): for its RPO term to be the token mean
    of the whole optimizer step, however the step is split, each micro-batch divides by the step's
    chosen tokens per micro-batch (`rpo_num_tokens` in `dpo.step`), not by its own count.
    """
    if num_tokens is None:
        num_tokens = chosen_lengths.sum()
    return -chosen_logps.sum() / num_tokens


def check_loss_options(
    *, beta: float, loss_type: str, label_smoothing: float = 0.0, simpo_gamma: float = 0.0
) -> None:
    """Raise ValueError, naming the parameter, for a loss configuration `dpo_loss` rejects."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0 or beta == float("inf"):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if loss_type == "sigmoid":
        eps_ok, allowed = 0 <= label_smoothing <= 0.5, "lie in [0, 0.5]"
    elif loss_type == "robust":
        eps_ok, allowed = 0 <= label_smoothing < 0.5, "lie in [0, 0.5)"
    else:
        eps_ok, allowed = label_smoothing == 0, "be 0 (only sigmoid and robust smooth labels)"
    if not eps_ok:
        raise ValueError(
            f"label_smoothing for loss_type={loss_type!r} must {allowed}, got {label_smoothing!r}")
    if simpo_gamma != 0 and loss_type != "simpo":
        raise ValueError(f"simpo_gamma is used by loss_type='simpo' only, got {simpo_gamma!r} "
                         f"with loss_type={loss_type!r}")


def _check_args(
    *logps: torch.Tensor | None,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    simpo_gamma: float,
) -> None:
    """Raise ValueError naming the offending parameter. Checks shapes and scalars only: looking
    at tensor values would force a device sync on every step."""
    check_loss_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                       simpo_gamma=simpo_gamma)

    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
             "ref_rejected_logps")
    tensors = dict(zip(names, logps))
    if loss_type in REFERENCE_FREE:
        del tensors["ref_chosen_logps"], tensors["ref_rejected_logps"]
    if loss_type in LENGTH_NORMALISED:
        tensors.update(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    for name, t in tensors.items():
        if t is None:
            why = (f"loss_type={loss_type!r} normalises by response length"
                   if name.endswith("lengths") else "the reference log-probs are needed")
            raise ValueError(f"{name} is required: {why}")
    shape = tensors["policy_chosen_logps"].shape
    if len(shape) != 1:
        raise ValueError(f"policy_chosen_logps must have shape (B,), got {tuple(shape)}")
    for name, t in tensors.items():
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                             "like policy_chosen_logps")
