"""Losses that need no reference model: its forward (or its precomputed log-probs) is skipped."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpo.loss.scores import LossOptions, Scores


def simpo(s: Scores, o: LossOptions) -> torch.Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): the reward is the length-normalised
    policy log-prob and γ = `simpo_gamma` a target margin. Needs the token counts.

        L = −log σ(β·(log π(y⁺)/|y⁺| − log π(y⁻)/|y⁻|) − γ)
    """
    return -F.logsigmoid(o.beta * (s.policy_chosen / s.chosen_lengths
                                   - s.policy_rejected / s.rejected_lengths) - o.simpo_gamma)


def sft(s: Scores, o: LossOptions) -> torch.Tensor:
    """Negative log-likelihood of the chosen responses, a token mean: supervised fine-tuning on
    y⁺ as a loss of its own, or as a term of a mixture (RPO, Pang et al. 2024, arXiv:2404.19733,
    Eq. 3, is DPO + α·sft). Needs the token counts.

    The token mean over the batch needs only summed log-probs and token counts, since
    −Σ_i Σ_t log π(y⁺_it) / Σ_i |y⁺_i| = −Σ_i log π(y⁺_i) / N. For the caller's mean over pairs
    to give it, pair i gets −log π(y⁺_i)·B/N. N is `num_tokens` when given — the optimizer step's
    chosen tokens per micro-batch (`dpo.train.step.sft_num_tokens`), so that the step's loss is the
    token mean over all its micro-batches and processes — else this batch's Σ_i |y⁺_i|.
    """
    num_tokens = s.chosen_lengths.sum() if o.num_tokens is None else o.num_tokens
    chosen = s.policy_chosen if s.sft_chosen is None else s.sft_chosen  # never LD-DPO's
    return -chosen * chosen.shape[0] / num_tokens


def orpo(s: Scores, o: LossOptions) -> torch.Tensor:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, §4): supervised fine-tuning on y⁺ plus λ times
    an odds-ratio term, in one stage and with no reference model. λ is `beta` (as TRL's
    `ORPOConfig.beta`, default 0.1). The odds read the length-averaged log-prob
    ā = log π(y|x)/|y|, the log of the paper's P(y|x), so odds(y) = e^ā / (1 − e^ā):

        L = L_sft − λ·log σ(log odds(y⁺) − log odds(y⁻))
        log odds(y⁺) − log odds(y⁻) = (ā⁺ − ā⁻) − (log(1 − e^ā⁺) − log(1 − e^ā⁻))

    L_sft is `sft`'s token-mean NLL of the chosen responses (over the optimizer step in
    training), so orpo is not mixed with sft, which would count it twice. Needs the token counts.
    """
    return sft(s, o) - o.beta * F.logsigmoid(log_odds_ratio(s.policy_chosen / s.chosen_lengths,
                                                            s.policy_rejected / s.rejected_lengths))


def log_odds_ratio(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds(y⁺) − log odds(y⁻) from the length-averaged log-probs ā⁺, ā⁻."""
    return (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − e^a) for a ≤ 0, without cancellation (Mächler 2012): log(−expm1(a)) from −ln 2 up,
    log1p(−e^a) below, TRL 1.16's branches. Each branch sees only inputs of its own range, so
    the other's infinities never reach the gradient: TRL's gradient is nan for a > −3e-8,
    where e^a rounds to 1 in float32 inside the branch it discards. And a is clamped to at
    most −tiny (the dtype's smallest normal number, 1.2e-38 in float32): a log-prob of exactly 0,
    every token certain, which float32 reaches, gives log(tiny) (−87.3) and no gradient through
    the clamp, where log(1 − e^0) would be −inf and the log odds inf or nan.
    """
    a = a.clamp(max=-torch.finfo(a.dtype).tiny)
    cut = -math.log(2)
    return torch.where(a < cut, torch.log1p(-torch.exp(a.clamp(max=cut))),
                       torch.log(-torch.expm1(a.clamp(min=cut))))
