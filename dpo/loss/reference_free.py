"""Losses that need no reference model: its forward (or its precomputed log-probs) is skipped."""
from __future__ import annotations

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
