"""Per-pair and per-token variants that change what any loss of the family reads, not the loss.

- WPO (`--use-weighting`): each pair's loss is multiplied by a weight, how likely the pair's
  responses are under the current policy (off-policy pairs count less);
- LD-DPO (`--ld-alpha`): a sequence's log-prob counts the tokens of the longer response past
  the shorter one's length α times (length desensitisation).

Both are pure functions of what `dpo.model.forward.concatenated_forward` returns for them.
"""
from __future__ import annotations

import torch


def wpo_weights(chosen_log_weights: torch.Tensor, rejected_log_weights: torch.Tensor
                ) -> torch.Tensor:
    """WPO's per-pair weight (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", arXiv:2406.11827, with its sampled weight alignment), `(B,)`, detached:

        log w(y) = (1/|y|)·Σ_t (log π(y_t|x, y_<t) − log Σ_v π(v|x, y_<t)²)
        weight   = min(1, w(y⁺)·w(y⁻))

    The policy's own probability of each response, per token and relative to what its
    distribution at that position would give its own samples on average (Σ_v π(v)², so that a
    peaked distribution does not pass for an on-policy one): pairs the policy would not have
    written weigh less, simulating on-policy data with an off-policy set. The weight is computed
    from the policy only and carries no gradient.

    It is clamped at 1, as in the WPO authors' released code (github.com/wzhouad/WPO,
    `scripts/run_wpo.py`) and in TRL 0.x. The alignment puts the policy's own samples at about
    1 (per token, E_{v~π}[π(v)/Σ_v π(v)²] = 1), the on-policy weight WPO simulates; w(y) exceeds
    it only for responses likelier than the policy's own average (its greedy output, say),
    which count as on-policy instead of outweighing the pairs it would sample. TRL 1.16
    (`DPOTrainer` with `use_weighting`) does not clamp: there such a pair's loss is multiplied
    by w > 1 (`tests/test_loss_trl.py`).

    Args:
        chosen_log_weights, rejected_log_weights: `(B,)` log w(y⁺), log w(y⁻)
            (`PairLogps.chosen_log_weights`).

    E.g. log w(y⁺) = −0.5, log w(y⁻) = −1.0: weight e^−1.5 = 0.22313016; log w(y⁺) = 0.75,
    log w(y⁻) = −0.25: e^0.5 > 1, so 1.
    """
    return torch.exp(chosen_log_weights + rejected_log_weights).clamp(max=1.0).detach()


def length_desensitised(logps: torch.Tensor, excess_logps: torch.Tensor, alpha: float
                        ) -> torch.Tensor:
    """LD-DPO's sequence log-prob (Liu et al. 2024, "Length Desensitization in Direct Preference
    Optimization", arXiv:2409.06411), `(B,)`:

        log π̂(y|x) = Σ_{t ≤ ℓ_p} log π(y_t|x, y_<t) + α·Σ_{t > ℓ_p} log π(y_t|x, y_<t)

    with ℓ_p = min(|y⁺|, |y⁻|) the pair's "public" length, t counted from the response's first
    token. The longer response's tokens past ℓ_p count α times (α = 1: DPO, exactly; α = 0: both
    responses cut to the shorter length), so a preference that is only "more text" moves the
    implicit reward less. Written as log π(y) − (1 − α)·Σ_{t > ℓ_p}, which is log π(y) itself
    at α = 1, to the bit.

    Applied to the policy and the reference alike, as the paper's objective compares π̂_θ with
    π̂_ref, and as TRL 1.16's `ld_alpha` does (its precomputed reference log-probs too): so that
    π = π_ref still gives Δ = 0, the loss ln 2 at step 0 and rewards that are log-ratios of the
    same quantity; with the policy alone, each pair's Δ would carry a constant
    −(1 − α)·Σ_{t > ℓ_p} log π_ref of the longer response, a margin that never moves.

    Args:
        logps: `(B,)` summed log-probs log π(y|x) of all response tokens.
        excess_logps: `(B,)` the part of that sum over the tokens past ℓ_p
            (`dpo.model.forward.excess_tokens`; 0 for the shorter response).
        alpha: α in [0, 1].

    E.g. a chosen response of 5 tokens with log-probs −1, −2, −1, −3, −1 and a rejected one of 3:
    ℓ_p = 3, so at α = 0.5 the chosen's log π̂ = (−1 − 2 − 1) + 0.5·(−3 − 1) = −6 (log π = −8),
    and the rejected's is its log π.
    """
    return logps - (1.0 - alpha) * excess_logps
