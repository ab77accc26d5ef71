"""One DPO step's arithmetic on a `[chosen; rejected]` batch, shared by training and eval:
policy forward → reference forward (no grad) → per-pair losses and rewards."""
from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator

from dpo.config import TrainConfig
from dpo.forward import PairLogps, concatenated_forward
from dpo.logprobs import IGNORE_INDEX
from dpo.loss import dpo_loss


def dpo_step(accelerator: Accelerator, cfg: TrainConfig, policy, reference, batch
             ) -> tuple[PairLogps, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(policy log-probs, losses, chosen rewards, rejected rewards)`, the last three `(B,)`.

    Both forwards run under `accelerator.autocast()`: with `--mixed_precision bf16` the matmuls
    run in bf16 while the log-probs are summed in fp32 (see `dpo.logprobs`). A batch that carries
    precomputed reference log-probs (`ref_chosen_logps`, `ref_rejected_logps`; see
    `dpo.reference_cache`) uses them and runs no reference forward; `reference` may then be None.
    """
    with accelerator.autocast():
        policy_out = concatenated_forward(policy, batch, chunked=cfg.chunked_logps,
                                          chunk_size=cfg.logps_chunk_size)
        ref_chosen = ref_rejected = None
        if "ref_chosen_logps" in batch:  # computed once before training: equal to a forward
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif reference is not None:  # None for a reference-free loss (SimPO)
            with torch.no_grad():
                ref_out = concatenated_forward(reference, batch, chunked=cfg.chunked_logps,
                                               chunk_size=cfg.logps_chunk_size)
            ref_chosen, ref_rejected = ref_out.chosen_logps, ref_out.rejected_logps
        losses, chosen_r, rejected_r = dpo_loss(
            policy_out.chosen_logps, policy_out.rejected_logps, ref_chosen, ref_rejected,
            beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
            chosen_lengths=policy_out.chosen_lengths, rejected_lengths=policy_out.rejected_lengths,
            simpo_gamma=cfg.simpo_gamma)
    return policy_out, losses, chosen_r, rejected_r


def chosen_token_counts(dataset) -> np.ndarray:
    """`(rows,)` number of chosen-response tokens of each tokenized pair: the label positions
    that `dpo.logprobs` sums (the causal shift leaves out position 0)."""
    labels = dataset.with_format("arrow")["chosen_labels"]  # honours a select()'s indices
    labels = labels.combine_chunks() if hasattr(labels, "combine_chunks") else labels
    offsets = labels.offsets.to_numpy()
    counted = np.asarray(labels.values) != IGNORE_INDEX
    counted[offsets[:-1][np.diff(offsets) > 0]] = False  # position 0 of each row
    running = np.concatenate([[0], np.cumsum(counted)])
    return running[offsets[1:]] - running[offsets[:-1]]


def rpo_num_tokens(global_batches: list[list[int]], token_counts: np.ndarray, micro_batches: int
                   ) -> list[float]:
    """The denominator of the RPO term (`chosen_nll_loss`) for each optimizer step of an epoch:
    the step's chosen tokens over all its micro-batches and processes, divided by their number.

    Accelerate divides each micro-batch's loss by the accumulation steps and data parallelism
    averages the processes' gradients, so the step's gradient is the mean over its
    `micro_batches` micro-batches; dividing each one's summed NLL by this number makes that mean
    the token mean over the whole step: 1 pair × 4 accumulation steps trains as 4 pairs × 1. The
    sampler fixes each step's pairs in advance, so no process waits for another to count them.
    """
    return [float(token_counts[batch].sum()) / micro_batches for batch in global_batches]
