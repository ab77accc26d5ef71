"""One model call for both halves of a preference batch.

The collator stacks each batch as `[chosen; rejected]`: rows `0..B-1` hold the chosen responses and
rows `B..2B-1` the rejected ones, row `i` and row `B+i` being the same pair. Running the model once
on all `2B` rows instead of twice on `B` halves the number of forward calls, keeps the matmuls
large, and — under DDP and ZeRO — means one forward per backward, which their hooks expect.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from dpo.logprobs import IGNORE_INDEX, chunked_sequence_logps, sequence_logps


@dataclass
class PairLogps:
    """Per-pair outputs of `concatenated_forward`; every field has shape `(B,)`."""

    chosen_logps: torch.Tensor  # Σ log π(y⁺_t | x, y⁺_<t), float32, with gradient
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor  # response token counts |y⁺|
    rejected_lengths: torch.Tensor
    chosen_logits_mean: torch.Tensor  # mean logit over response tokens and vocab (detached)
    rejected_logits_mean: torch.Tensor


def concatenated_forward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    chunked: bool = True,
    chunk_size: int = 256,
) -> PairLogps:
    """Summed response log-probs of the chosen and rejected halves of `batch`, in one model call.

    Args:
        model: a causal LM (`AutoModelForCausalLM`), possibly wrapped by DDP, DeepSpeed or FSDP.
            It is called through the wrapper, so gradient synchronisation and ZeRO hooks run.
        batch: `input_ids`, `attention_mask` and `labels`, each `[2B, T]`, stacked
            `[chosen; rejected]`, with `labels` = −100 on prompt and padding.
        chunked: project only response tokens onto the vocabulary, in chunks
            (`chunked_sequence_logps`); False computes the full `[2B, T, V]` logits.
        chunk_size: tokens per LM-head call on the chunked path.
    """
    labels = batch["labels"]
    if labels.shape[0] % 2:
        raise ValueError(f"a [chosen; rejected] batch has an even number of rows, got "
                         f"{labels.shape[0]}")
    attention_mask = causal_attention_mask(batch["attention_mask"])
    if chunked:
        # logits_to_keep=1 makes the model's own LM head cost one position; the last hidden state
        # (after the final norm) goes to our chunked head instead.
        out = model(input_ids=batch["input_ids"], attention_mask=attention_mask,
                    output_hidden_states=True, logits_to_keep=1, use_cache=False)
        lm_head = extract_model_from_parallel(model).get_output_embeddings()
        logps, lengths, logits_sums = chunked_sequence_logps(
            out.hidden_states[-1], lm_head, labels, IGNORE_INDEX, chunk_size)
        vocab_size = lm_head.out_features
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=attention_mask,
                       use_cache=False).logits  # [2B, T, V]
        logps, lengths = sequence_logps(logits, labels, IGNORE_INDEX)
        mask = (labels[:, 1:] != IGNORE_INDEX).unsqueeze(-1)  # [2B, T-1, 1]
        logits_sums = (logits[:, :-1].detach().float() * mask).sum((1, 2))  # (2B,)
        vocab_size = logits.shape[-1]

    # Mean logit per sequence; clamp only guards the 0/0 of a response-free row.
    logits_mean = logits_sums / (lengths.clamp(min=1) * vocab_size)  # (2B,)
    half = labels.shape[0] // 2
    return PairLogps(
        chosen_logps=logps[:half], rejected_logps=logps[half:],
        chosen_lengths=lengths[:half], rejected_lengths=lengths[half:],
        chosen_logits_mean=logits_mean[:half], rejected_logits_mean=logits_mean[half:],
    )


def causal_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """None when every row is right-padded (ones, then zeros), else `attention_mask`.

    Under causal attention a token sees only earlier positions, so in a right-padded row no real
    token ever sees padding: the mask changes nothing the loss reads (padding positions carry
    label −100), and without it attention takes its mask-free causal kernel — on CPU, SmolLM2-135M
    at 4×256 tokens, forward+backward 13% faster. Position ids are 0..T−1 either way. A
    left-padded batch keeps its mask. (The check costs one host sync per forward.)
    """
    right_padded = attention_mask.cumprod(-1).eq(attention_mask).all()
    return None if bool(right_padded) else attention_mask
