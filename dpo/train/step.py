"""One DPO step's arithmetic on a `[chosen; rejected]` batch, shared by training and eval:
policy forward → reference forward (no grad) → per-pair losses and rewards; and `Objective`, the
loss's state across steps (token-mean denominators, BCO's baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from dpo.config import TrainConfig
from dpo.model.forward import PairLogps, concatenated_forward
from dpo.model.logprobs import IGNORE_INDEX
from dpo.loss import LOSSES, BCOBaseline, dpo_loss, is_unpaired
from dpo.loss.ranked import ranking_loss
from dpo.loss.variants import wpo_weights
from dpo.train.ref_sync import ReferenceSync


@dataclass
class StepOutput:
    policy: PairLogps  # the policy's summed log-probs, token counts and mean logits
    losses: torch.Tensor  # (B,) per-pair loss: the weighted sum of the terms
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor
    terms: dict[str, torch.Tensor]  # loss type -> (B,) unweighted per-pair loss
    aux_loss: torch.Tensor | None = None  # a mixture of experts' router loss (unweighted), ()
    weights: torch.Tensor | None = None  # (B,) WPO's pair weights (`--use-weighting`), detached
    labels: torch.Tensor | None = None  # (B,) KTO's: True for a desirable completion
    kl: torch.Tensor | None = None  # () KTO's KL estimate z₀, detached
    # Rankings: (B, K) each response's reward (detached), which slots hold one, (B,) stages
    slot_rewards: torch.Tensor | None = None
    ranking_mask: torch.Tensor | None = None
    stages: torch.Tensor | None = None


def dpo_step(accelerator: Accelerator, cfg: TrainConfig, policy, reference, batch, *,
             bco_delta: torch.Tensor | float = 0.0,
             num_tokens: torch.Tensor | float | None = None) -> StepOutput:
    """The policy's log-probs, the per-pair losses and the implicit rewards of one batch.

    Both forwards run under `accelerator.autocast()`: with `--mixed_precision bf16` the matmuls
    run in bf16 while the log-probs are summed in fp32 (see `dpo.model.logprobs`). A batch that
    carries precomputed reference log-probs (`ref_chosen_logps`, `ref_rejected_logps`; see
    `dpo.train.reference_cache`) uses them and runs no reference forward; `reference` may then
    be None.
    `bco_delta` and `num_tokens` are the loss state that outlives a batch (`Objective`). With
    `router_aux_loss_coef` > 0 (a mixture of experts) the policy's router load-balancing loss,
    times the coefficient, is added to every pair's loss, so the batch mean carries it once.

    An unpaired batch (KTO, `label`) holds each row's completion in the chosen slot and the
    mismatched completion of the KL estimate in the rejected slot: z₀ comes from the latter
    (`kto_kl`). A ranked batch (`ranking_mask`, `stages`: rankings of N responses) takes the
    ranking loss `cfg.ranking_loss` (`dpo.loss.ranked`) instead; for N = 2 it is DPO's to the
    last bit.

    With `ld_alpha` (LD-DPO) the losses read the length-desensitised log-probs of policy and
    reference (the precomputed ones are stored so), `sft` the plain ones; with `use_weighting`
    (WPO) each pair's loss is multiplied by its weight, from the policy's forward, before the
    router loss is added.
    """
    router_aux = bool(cfg.router_aux_loss_coef)
    ld = cfg.ld_alpha is not None
    with accelerator.autocast():
        policy_out = concatenated_forward(policy, batch, chunked=cfg.chunked_logps,
                                          chunk_size=cfg.logps_chunk_size, router_aux=router_aux,
                                          ld_alpha=cfg.ld_alpha, weighting=cfg.use_weighting)
        ref_chosen = ref_rejected = ref_out = None
        if "ref_chosen_logps" in batch:  # computed once before training: equal to a forward
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif reference is not None:  # None for a reference-free loss (SimPO)
            with torch.no_grad():
                # The policy's attention path (masked for its router loss): π = π_ref must
                # give Δ = 0 exactly at step 0.
                ref_out = concatenated_forward(reference, batch, chunked=cfg.chunked_logps,
                                               chunk_size=cfg.logps_chunk_size,
                                               full_mask=router_aux, ld_alpha=cfg.ld_alpha)
            ref_chosen, ref_rejected = ((ref_out.chosen_ld_logps, ref_out.rejected_ld_logps) if ld
                                        else (ref_out.chosen_logps, ref_out.rejected_logps))
        weights = (wpo_weights(policy_out.chosen_log_weights, policy_out.rejected_log_weights)
                   if cfg.use_weighting else None)
        labels = batch["label"] if is_unpaired(cfg.loss_type) else None
        kl = (kto_kl(accelerator, policy_out.rejected_logps, ref_rejected) if labels is not None
              else None)
        if "ranking_mask" in batch:  # sigmoid alone, the loaders saw to it
            losses, slot_rewards = ranking_loss(
                policy_out.slot_logps, ref_out.slot_logps, batch["ranking_mask"],
                batch["stages"], beta=cfg.beta, kind=cfg.ranking_loss)
            terms = {"sigmoid": losses}
            if router_aux:
                losses = losses + cfg.router_aux_loss_coef * policy_out.aux_loss.float()
            return StepOutput(policy_out, losses, slot_rewards[:, 0], slot_rewards[:, 1],
                              terms, policy_out.aux_loss,
                              slot_rewards=slot_rewards, ranking_mask=batch["ranking_mask"],
                              stages=batch["stages"])
        losses, chosen_r, rejected_r, terms = dpo_loss(
            *((policy_out.chosen_ld_logps, policy_out.rejected_ld_logps) if ld
              else (policy_out.chosen_logps, policy_out.rejected_logps)), ref_chosen, ref_rejected,
            beta=cfg.beta, loss_type=cfg.loss_type, loss_weights=cfg.loss_weights,
            label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
            discopop_tau=cfg.discopop_tau, f_divergence_type=cfg.f_divergence_type,
            f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
            bco_delta=bco_delta, num_tokens=num_tokens,
            chosen_lengths=policy_out.chosen_lengths, rejected_lengths=policy_out.rejected_lengths,
            pair_weights=weights, sft_chosen_logps=policy_out.chosen_logps if ld else None,
            labels=labels, kl=0.0 if kl is None else kl, desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight, return_terms=True)
    if router_aux:
        losses = losses + cfg.router_aux_loss_coef * policy_out.aux_loss.float()
    return StepOutput(policy_out, losses, chosen_r, rejected_r, terms, policy_out.aux_loss,
                      weights, labels, kl)


def kto_kl(accelerator: Accelerator, policy_logps: torch.Tensor, ref_logps: torch.Tensor
           ) -> torch.Tensor:
    """KTO's reference point z₀: the policy's KL divergence from the reference, estimated as the
    mean log-ratio of the micro-batch's mismatched completions (`dpo.data.unpaired`) over every
    process's rows, clamped at 0 and detached (the KTO paper, §4.1; TRL 1.16's `KTOTrainer`
    takes the mean of the processes' means, equal for equal micro-batches). An all-reduce: every
    process calls it at every micro-batch, as they all run the same number."""
    rows = torch.tensor(float(policy_logps.shape[0]), device=policy_logps.device)
    total = torch.stack([(policy_logps - ref_logps).detach().float().sum(), rows])
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).clamp(min=0)


class Objective:
    """What the loss needs beyond a batch, across the steps of a run.

    - ``sft`` (and RPO, and ORPO's NLL) is a token mean over the optimizer step: each micro-batch
      divides its summed NLL by the step's chosen tokens per micro-batch (`sft_num_tokens`), fixed
      per epoch by the sampler's global batches;
    - ``bco_pair``'s baseline δ (`BCOBaseline`) moves once per optimizer step and is saved in
      checkpoints;
    - with `--sync-ref-model` (TR-DPO, `dpo.train.ref_sync`) the reference follows the policy every
      few steps, and is saved in checkpoints too.
    Create it before a resume loads its checkpoint, which restores what it registers.
    """

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, train_ds, policy=None,
                 reference=None):
        self.accelerator, self.cfg = accelerator, cfg
        self.bco = (BCOBaseline() if "bco_pair" in cfg.loss_type
                    and cfg.bco_baseline == "running_mean" else None)
        self.sync = (ReferenceSync(accelerator, cfg, policy, reference) if cfg.sync_ref_model
                     else None)
        for state in (self.bco, self.sync):
            if state is not None:
                accelerator.register_for_checkpointing(state)
        self.token_counts = chosen_token_counts(train_ds) if token_mean(cfg) else None
        self.step_tokens: list[float] = []

    @property
    def bco_delta(self) -> float:
        return 0.0 if self.bco is None else self.bco.mean

    def start_epoch(self, sampler) -> None:
        if self.token_counts is not None:
            self.step_tokens = sft_num_tokens(
                sampler.global_batches(), self.token_counts,
                self.cfg.gradient_accumulation_steps * self.accelerator.num_processes)

    def train_step(self, policy, reference, batch, batch_index: int) -> StepOutput:
        """`dpo_step` on the `batch_index`-th (from 1) micro-batch of the epoch."""
        step = (batch_index - 1) // self.cfg.gradient_accumulation_steps
        out = dpo_step(self.accelerator, self.cfg, policy, reference, batch,
                       bco_delta=self.bco_delta,
                       num_tokens=self.step_tokens[step] if self.step_tokens else None)
        if self.bco is not None:
            self.bco.add(out.chosen_rewards, out.rejected_rewards)
        return out

    def end_step(self, step: int) -> None:
        """After optimizer step `step` (from 1): fold the step's rewards into δ (an all-reduce),
        and sync the reference when it is due."""
        if self.bco is not None:
            self.bco.update(self.accelerator)
        if self.sync is not None:
            self.sync.end_step(step)


def token_mean(cfg: TrainConfig) -> bool:
    """Whether a loss of the run is a token mean over the chosen tokens (sft, orpo's NLL),
    which reads the denominator `num_tokens`."""
    return any(LOSSES[t].num_tokens for t in cfg.loss_type)


def chosen_token_counts(dataset) -> np.ndarray:
    """`(rows,)` number of chosen-response tokens of each tokenized pair: the label positions
    that `dpo.model.logprobs` sums (the causal shift leaves out position 0)."""
    labels = dataset.with_format("arrow")["chosen_labels"]  # honours a select()'s indices
    labels = labels.combine_chunks() if hasattr(labels, "combine_chunks") else labels
    offsets = labels.offsets.to_numpy()
    counted = np.asarray(labels.values) != IGNORE_INDEX
    counted[offsets[:-1][np.diff(offsets) > 0]] = False  # position 0 of each row
    running = np.concatenate([[0], np.cumsum(counted)])
    return running[offsets[1:]] - running[offsets[:-1]]


def sft_num_tokens(global_batches: list[list[int]], token_counts: np.ndarray, micro_batches: int
                   ) -> list[float]:
    """The denominator of the ``sft`` loss (`dpo.loss.reference_free.sft`) for each optimizer
    step of an epoch: the step's chosen tokens over all its micro-batches and processes, divided
    by their number.

    Accelerate divides each micro-batch's loss by the accumulation steps and data parallelism
    averages the processes' gradients, so the step's gradient is the mean over its
    `micro_batches` micro-batches; dividing each one's summed NLL by this number makes that mean
    the token mean over the whole step: 1 pair × 4 accumulation steps trains as 4 pairs × 1. The
    sampler fixes each step's pairs in advance, so no process waits for another to count them.
    """
    return [float(token_counts[batch].sum()) / micro_batches for batch in global_batches]
