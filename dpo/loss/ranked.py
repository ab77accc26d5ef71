"""Losses of rankings: rows of N ≥ 2 responses ordered best first, not one pair.

Every tensor is `(B, K)`: row b's responses in slots 0..K−1, best first, `mask[b, k]` true where
row b has a k-th response (a row of N < K responses fills slots 0..N−1). `stages[b]` says how
much of the order the data knows: N − 1 for a full ranking, 1 for a best response over an
unordered list of others. With lr = log π(y|x) − log π_ref(y|x), each response's implicit reward
is β·lr (DPO paper, §5). A ranking of two responses is a pair, and its loss is DPO's sigmoid
loss bit for bit (`delta.sigmoid`, the same float operations).
"""
from __future__ import annotations

import torch

from dpo.loss import delta
from dpo.loss.scores import LossOptions, Scores

RANKING_LOSSES = ("plackett_luce", "all_pairs")


def _pair_loss(policy: torch.Tensor, reference: torch.Tensor, i: int, j: int, beta: float
               ) -> torch.Tensor:
    """(B,) −log σ(β·((π_i − ref_i) − (π_j − ref_j))): DPO's loss of slot i over slot j, by
    `delta.sigmoid` itself so that a pair's loss is DPO's to the last bit."""
    scores = Scores(policy[:, i], policy[:, j], reference[:, i], reference[:, j])
    return delta.sigmoid(scores, LossOptions(beta))


def plackett_luce(policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
                  stages: torch.Tensor, beta: float) -> torch.Tensor:
    """Plackett–Luce DPO (Rafailov et al. 2023, arXiv:2305.18290, §5 and Appendix A.3): the
    likelihood of the ranking y_1 ≻ … ≻ y_N under the Plackett–Luce model of the implicit
    rewards, its first S stages (each stage picks the best of the responses left):

        L = Σ_{k=1}^{S} −log( exp(β·lr_k) / Σ_{j ≥ k} exp(β·lr_j) ),   S = min(stages, N − 1)

    A stage with exactly two responses left is −log σ(β·(lr_k − lr_{k+1})), computed as DPO's
    loss is (`delta.sigmoid`), so that N = 2 is DPO bit for bit. Returns `(B,)` losses.
    """
    rows, slots = mask.shape
    scaled = beta * (policy - reference)  # (B, K)
    left = mask.flip(-1).cumsum(-1).flip(-1)  # responses in slots k.. of each row
    limit = torch.minimum(stages, mask.sum(-1) - 1)  # S
    total = torch.zeros(rows, dtype=scaled.dtype, device=scaled.device)
    for k in range(slots - 1):
        # Missing slots leave the sum; a stage whose own slot is missing sums zeros (finite
        # values keep the gradient free of NaN where it is masked out).
        terms = torch.where(mask[:, k:], scaled[:, k:], -torch.inf)
        terms = torch.where(mask[:, k:k + 1], terms, 0.0)
        softmax = torch.logsumexp(terms, dim=-1) - scaled[:, k]
        stage = torch.where(left[:, k] == 2, _pair_loss(policy, reference, k, k + 1, beta),
                            softmax)
        total = total + torch.where(k < limit, stage, 0.0)
    return total


def all_pairs(policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
              stages: torch.Tensor, beta: float) -> torch.Tensor:
    """The mean of DPO's loss over the ordered pairs the data knows: y_i ≻ y_j for i < j with
    i ≤ S (S = stages: every i < j of a full ranking; (1, j) for a best response over an
    unordered list), the pairwise reduction of a ranking (the DPO paper's §5 notes both):

        L = mean_{i < j, i ≤ S} −log σ(β·(lr_i − lr_j))

    Returns `(B,)` losses; a ranking of two responses has one pair, its DPO loss.
    """
    rows, slots = mask.shape
    total = torch.zeros(rows, dtype=policy.dtype, device=policy.device)
    count = torch.zeros(rows, dtype=policy.dtype, device=policy.device)
    for i in range(slots - 1):
        for j in range(i + 1, slots):
            known = mask[:, j] & (i < stages)
            total = total + torch.where(known, _pair_loss(policy, reference, i, j, beta), 0.0)
            count = count + known
    return total / count.clamp(min=1)


def ranked_pairs(mask: torch.Tensor, stages: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs the metrics read: `(better (B, K) long, compared (B, K) bool)`. Each response
    but the best (`compared`) is compared with the one ranked just above it (slot k − 1), or,
    when the data orders only the best (stages 1), with the best (slot 0)."""
    slots = torch.arange(mask.shape[1], device=mask.device)
    better = torch.where(stages.unsqueeze(-1) == 1, 0, (slots - 1).clamp(min=0))
    return better.expand(mask.shape), mask & (slots > 0)


def ranking_loss(policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
                 stages: torch.Tensor, *, beta: float, kind: str = "plackett_luce"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(losses (B,), rewards (B, K))`: the ranking loss `kind` (`RANKING_LOSSES`) of each row
    and each response's implicit reward β·lr, detached (0 in missing slots)."""
    if kind not in RANKING_LOSSES:
        raise ValueError(f"ranking_loss must be one of {RANKING_LOSSES}, got {kind!r}")
    if policy.shape != mask.shape or reference.shape != mask.shape or policy.dim() != 2:
        raise ValueError(f"policy {tuple(policy.shape)} and reference "
                         f"{tuple(reference.shape)} log-probs must have the mask's shape "
                         f"{tuple(mask.shape)} (B, K)")
    fn = plackett_luce if kind == "plackett_luce" else all_pairs
    losses = fn(policy, reference, mask, stages, beta)
    rewards = torch.where(mask, beta * (policy - reference), 0.0).detach()
    return losses, rewards
