"""One DPO step as the paper writes it: the executable spec the rest of `dpo` is held to.

Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model", arXiv:2305.18290, eq. 7) trains a policy π on pairs
(x, y⁺, y⁻) — a prompt, a preferred and a dispreferred response — against a frozen reference
π_ref (the starting model), with the loss

    L = −log σ(β·[(log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x))])

averaged over the pairs of a batch, where log π(y|x) = Σ_t log π(y_t | x, y_<t) sums over the
response tokens only and β sets how far π may move from π_ref. The implicit rewards are
r̂(x, y) = β·(log π(y|x) − log π_ref(y|x)); the loss is −log σ(r̂⁺ − r̂⁻), a logistic
(Bradley–Terry) classifier of which response people preferred. docs/dpo.md derives it.

Read this file first: it is the whole step in plain torch and transformers, nothing else —
full `[2B, T, V]` logits, a log-softmax over all of them, a gather, masked sums, the sigmoid
loss, backward. The training step (`dpo.step.dpo_step` on `dpo.forward.concatenated_forward`)
computes the same numbers faster: an LM head on response tokens only, in chunks; packed
(padding-free) rows; reference log-probs computed once before training; LoRA. Tests
(tests/test_textbook.py) hold that step equal to this function (loss, log-probs, rewards,
every gradient, to 1e-5 relative) and one optimizer step of `train.py` to this function followed
by AdamW. `bench/bench_train.py --compare` times this step as "plain".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # the label of prompt and padding positions: not part of log π(y|x)


@dataclass
class TextbookStep:
    """What one step computes; every per-pair field has shape `(B,)`."""

    loss: torch.Tensor  # () the batch mean of `losses`: what backward differentiates
    losses: torch.Tensor  # −log σ(r̂⁺ − r̂⁻) per pair
    chosen_logps: torch.Tensor  # log π(y⁺|x), float32, with gradient
    rejected_logps: torch.Tensor  # log π(y⁻|x)
    ref_chosen_logps: torch.Tensor  # log π_ref(y⁺|x), no gradient
    ref_rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor  # r̂⁺ = β·(log π(y⁺|x) − log π_ref(y⁺|x)), detached
    rejected_rewards: torch.Tensor  # r̂⁻


def response_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`(2B,)` log π(y|x) of each row of a right-padded batch: Σ_t log π(y_t | x, y_<t).

    `batch` holds `input_ids`, `attention_mask` and `labels`, each `[2B, T]`; `labels` repeats
    the input ids on response tokens and is −100 on prompt and padding.
    """
    # One call for all 2B rows. The attention mask keeps each row's real tokens from attending
    # to its padding; right padding leaves the positions of real tokens as they are.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits  # [2B, T, V]
    # A causal LM's logits at position t predict the token at t + 1: drop the last position's
    # logits (they predict past the end) and the first label (nothing predicts it).
    logits, labels = logits[:, :-1], batch["labels"][:, 1:]  # [2B, T-1, V], [2B, T-1]
    # log π(v | prefix) = z_v − logsumexp(z), in float32: in bf16 the normaliser over a vocabulary
    # of 10⁵ logits keeps ~3 digits, and the sum below adds up hundreds of such terms.
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    # Each position's log-prob of the token that actually came next. −100 is no token id: clamp it
    # to a valid one for the gather, and let the mask zero those positions afterwards.
    mask = labels != IGNORE_INDEX
    token_logps = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # The chain rule: the log-probability of the whole response is the sum over its tokens. A sum,
    # not a mean: the paper's log π(y|x) is a sequence's probability, and a mean would make a
    # long response count as much per token as a short one.
    return (token_logps * mask).sum(-1)


def textbook_dpo_step(policy: nn.Module, reference: nn.Module, batch: dict[str, torch.Tensor],
                      beta: float, *, backward: bool = True) -> TextbookStep:
    """The DPO loss of one `[chosen; rejected]` batch, its rewards, and (with `backward`) the
    policy's gradients in `.grad` (accumulated, as `loss.backward()` does).

    Rows `0..B-1` of `batch` are the chosen responses y⁺, rows `B..2B-1` the rejected ones y⁻,
    row `i` and row `B + i` one pair (`dpo.data.PreferenceCollator` lays batches out so).
    `reference` is the frozen π_ref. `backward=False` leaves the backward to the caller (for
    example `accelerator.backward(step.loss)`, which also scales for gradient accumulation).
    """
    if batch["input_ids"].shape[0] % 2:
        raise ValueError(f"a [chosen; rejected] batch has an even number of rows, got "
                         f"{batch['input_ids'].shape[0]}")
    half = batch["input_ids"].shape[0] // 2
    policy_logps = response_logps(policy, batch)
    # π_ref is a constant of the loss: no graph, no gradient, no activations kept for backward.
    with torch.no_grad():
        ref_logps = response_logps(reference, batch)
    chosen_logps, rejected_logps = policy_logps[:half], policy_logps[half:]
    ref_chosen, ref_rejected = ref_logps[:half], ref_logps[half:]

    # How much more (log) likely each response became under π than under π_ref.
    chosen_log_ratio = chosen_logps - ref_chosen  # log π(y⁺|x) − log π_ref(y⁺|x)
    rejected_log_ratio = rejected_logps - ref_rejected  # log π(y⁻|x) − log π_ref(y⁻|x)
    # −log σ(z) as one function: log(sigmoid(z)) is −inf once σ(z) rounds to 0 (z < −88 in
    # float32), logsigmoid stays finite and exact.
    losses = -F.logsigmoid(beta * (chosen_log_ratio - rejected_log_ratio))
    loss = losses.mean()
    if backward:
        loss.backward()
    # The implicit rewards are read, not trained: detached, so logging them adds no graph.
    return TextbookStep(loss, losses, chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                        (beta * chosen_log_ratio).detach(), (beta * rejected_log_ratio).detach())


def textbook_kto_step(policy: nn.Module, reference: nn.Module, batch: dict[str, torch.Tensor],
                      beta: float, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> TextbookStep:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7) on one batch of unpaired rows, with
    the policy's gradients in `.grad`: each row i is (x_i, y_i) with a label, desirable or not.

    Rows `0..B-1` of `batch` are the rows themselves, rows `B..2B-1` the mismatched pairs
    (x_i, y_{i−1}) that estimate the reference point z₀ = KL(π‖π_ref), and `label` is `(B,)`
    bool (`dpo.data.PreferenceCollator` lays unpaired batches out so). With r_i = log π(y_i|x_i)
    − log π_ref(y_i|x_i), the loss of a desirable row is λ_D·(1 − σ(β(r_i − z₀))), of an
    undesirable one λ_U·(1 − σ(β(z₀ − r_i))). The `chosen` fields of the result hold the rows,
    the `rejected` ones the mismatched pairs.
    """
    half = batch["input_ids"].shape[0] // 2
    rows = {k: batch[k][:half] for k in ("input_ids", "attention_mask", "labels")}
    mismatched = {k: batch[k][half:] for k in ("input_ids", "attention_mask", "labels")}
    logps = response_logps(policy, rows)
    with torch.no_grad():
        ref_logps = response_logps(reference, rows)
        # z₀ is a reference point, not a target: the paper takes no gradient through it.
        kl_logps, ref_kl_logps = response_logps(policy, mismatched), response_logps(
            reference, mismatched)
        kl = (kl_logps - ref_kl_logps).mean().clamp(min=0)
    log_ratio = logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - log_ratio)))
    losses = torch.where(batch["label"], desirable, undesirable)
    loss = losses.mean()
    loss.backward()
    return TextbookStep(loss, losses, logps, kl_logps, ref_logps, ref_kl_logps,
                        (beta * log_ratio).detach(), (beta * (kl_logps - ref_kl_logps)).detach())


def textbook_plackett_luce_step(policy: nn.Module, reference: nn.Module,
                                batch: dict[str, torch.Tensor], beta: float) -> TextbookStep:
    """Plackett–Luce DPO (Rafailov et al. 2023, arXiv:2305.18290, §5 and Appendix A.3) on one
    batch of rankings, with the policy's gradients in `.grad`: row b ranks its responses
    y_1 ≻ … ≻ y_N best first, and with r_k = β·(log π(y_k|x) − log π_ref(y_k|x)) its loss is
    the negative log-likelihood of the first S choices of that order,

        L_b = Σ_{k=1}^{S} −log( exp(r_k) / Σ_{j=k}^{N} exp(r_j) ),   S = min(stages_b, N − 1)

    (N − 1 stages for a full ranking, 1 for the best over an unordered list). The batch is
    `dpo.data.PreferenceCollator`'s padded K-slot layout: rows `kB..(k+1)B − 1` hold each
    row's response of rank k + 1, `ranking_mask` (B, K) says which exist, `stages` (B,). The
    `chosen`/`rejected` fields of the result hold ranks 1 and 2.
    """
    mask, stages = batch["ranking_mask"], batch["stages"]
    rows, slots = mask.shape
    logps = response_logps(policy, batch).reshape(slots, rows).T  # (B, K)
    with torch.no_grad():
        ref_logps = response_logps(reference, batch).reshape(slots, rows).T
    rewards = beta * (logps - ref_logps)
    losses = []
    for b in range(rows):
        n = int(mask[b].sum())
        r = rewards[b, :n]
        # Each stage picks the best of the responses left: a softmax over them.
        losses.append(sum(torch.logsumexp(r[k:], 0) - r[k]
                          for k in range(min(int(stages[b]), n - 1))))
    losses = torch.stack(losses)
    loss = losses.mean()
    loss.backward()
    return TextbookStep(loss, losses, logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1],
                        rewards[:, 0].detach(), rewards[:, 1].detach())
