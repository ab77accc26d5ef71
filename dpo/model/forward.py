"""One model call for both halves of a preference batch.

The collator stacks each batch as `[chosen; rejected]`: rows `0..B-1` hold the chosen responses and
rows `B..2B-1` the rejected ones, row `i` and row `B+i` being the same pair. Running the model once
on all `2B` rows instead of twice on `B` halves the number of forward calls, keeps the matmuls
large, and — under DDP and ZeRO — means one forward per backward, which their hooks expect.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from dpo.loss.variants import length_desensitised
from dpo.model.logprobs import IGNORE_INDEX, LogitsTransform, chunked_response_sums, response_sums
from dpo.model.packed_attention import use_packed_sdpa
from dpo.model.shared_prompt import attention_masks, unshare
from dpo.model.vision import image_inputs


@dataclass
class PairLogps:
    """Per-pair outputs of `concatenated_forward`; every field has shape `(B,)`."""

    chosen_logps: torch.Tensor  # Σ log π(y⁺_t | x, y⁺_<t), float32, with gradient
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor  # response token counts |y⁺|
    rejected_lengths: torch.Tensor
    chosen_logits_mean: torch.Tensor  # mean logit over response tokens and vocab (detached)
    rejected_logits_mean: torch.Tensor
    aux_loss: torch.Tensor | None = None  # a mixture of experts' router balancing loss, ()
    # LD-DPO (`ld_alpha`): Σ_{t ≤ ℓ_p} log π(y_t) + α·Σ_{t > ℓ_p} log π(y_t), with gradient
    chosen_ld_logps: torch.Tensor | None = None
    rejected_ld_logps: torch.Tensor | None = None
    # WPO (`weighting`): log w = mean_t (log π(y_t) − log Σ_v π(v)²), detached
    chosen_log_weights: torch.Tensor | None = None
    rejected_log_weights: torch.Tensor | None = None
    # Rankings (a batch with `ranking_mask`): every slot's log-probs, token counts and mean
    # logits, (B, K); `chosen_*`/`rejected_*` are slots 0 and 1
    slot_logps: torch.Tensor | None = None
    slot_lengths: torch.Tensor | None = None
    slot_logits_mean: torch.Tensor | None = None


def concatenated_forward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    chunked: bool = True,
    chunk_size: int = 256,
    router_aux: bool = False,
    full_mask: bool = False,
    ld_alpha: float | None = None,
    weighting: bool = False,
) -> PairLogps:
    """Summed response log-probs of the chosen and rejected halves of `batch`, in one model call.

    Args:
        model: a causal LM (`AutoModelForCausalLM`), possibly wrapped by DDP, DeepSpeed or FSDP.
            It is called through the wrapper, so gradient synchronisation and ZeRO hooks run.
        batch: `input_ids`, `attention_mask` and `labels`, each `[2B, T]`, stacked
            `[chosen; rejected]`, with `labels` = −100 on prompt and padding. Or a packed
            (padding-free) batch of `PreferenceCollator(padding_free=True)`: the same three
            and `position_ids` `[R, L]`, with `packed_sequences` `(2B, 3)` saying where each
            sequence lies; the model then gets no attention mask (see `_unpack`), and the
            results are laid out as for a padded batch. A ranked batch (with `ranking_mask`
            (B, K)) has K slots `[rank 1; rank 2; ...]` of B rows each; its `PairLogps` add
            each slot's values as `slot_*` (B, K). A vision-language model's batch adds each
            pair's images once (`pixel_values`, ...: `dpo.model.vision.image_inputs`).
        chunked: project only response tokens onto the vocabulary, in chunks
            (`chunked_sequence_logps`); False computes the full `[2B, T, V]` logits.
        chunk_size: tokens per LM-head call on the chunked path.
        router_aux: also return a mixture-of-experts model's router load-balancing loss
            (`output_router_logits`), computed over the real tokens only: the model then gets
            the real attention mask, not the mask-free fast path (`causal_attention_mask`),
            which would let padding into the balance.
        full_mask: pass the real attention mask even without `router_aux` (for a reference that
            must compute exactly what such a policy computes).
        ld_alpha: also return LD-DPO's log-probs (`chosen_ld_logps`, ...): the tokens of the
            longer response past the shorter one's length count α times (`excess_tokens`).
        weighting: also return WPO's per-sequence log-weights (`chosen_log_weights`, ...).
        Both come from the same pass over the logits (or chunks) as the log-probs.
    """
    inputs, index, labels = _model_inputs(model, batch, router_aux or full_mask)
    ranked = "ranking_mask" in batch
    slots = batch["ranking_mask"].shape[1] if ranked else 2
    if "pixel_values" in batch:  # each pair's images encoded once (dpo.model.vision)
        inputs.update(image_inputs(model, batch, slots, index))
    if labels.shape[0] % slots:
        what = f"ranked batch of {slots} slots has a multiple of {slots}" if ranked else \
            "[chosen; rejected] batch has an even number"
        raise ValueError(f"a {what} of rows, got {labels.shape[0]}")
    extra = {"output_router_logits": True} if router_aux else {}
    options = dict(excess=None if ld_alpha is None else excess_tokens(labels), weighting=weighting)
    if chunked:
        # logits_to_keep=1 makes the model's own LM head cost one position; the last hidden state
        # (after the final norm) goes to our chunked head instead. It is taken from the model's
        # body by a hook rather than with output_hidden_states, which would keep every layer's
        # output alive until the call returns, also in a no-grad forward.
        unwrapped = extract_model_from_parallel(model)
        with _last_hidden_state(unwrapped) as captured:
            out = model(**inputs, logits_to_keep=1, use_cache=False, **extra)
        lm_head = unwrapped.get_output_embeddings()
        if not isinstance(lm_head, nn.Linear):
            raise ChunkedHeadUnsupported(f"its LM head is a {type(lm_head).__name__}, not an "
                                         "nn.Linear")
        hidden = captured.hidden if index is None else captured.hidden.flatten(0, 1)[index]
        sums = chunked_response_sums(hidden, lm_head, labels, IGNORE_INDEX, chunk_size,
                                     LogitsTransform.from_config(unwrapped.config), **options)
        vocab_size = lm_head.out_features
    else:
        out = model(**inputs, use_cache=False, **extra)
        logits = out.logits  # [2B, T, V], packed or shared-prompt [R, L, V]
        if index is not None:
            logits = logits.flatten(0, 1)[index]
        sums = response_sums(logits, labels, IGNORE_INDEX, **options)
        vocab_size = logits.shape[-1]

    logps, lengths = sums.logps, sums.counts  # (2B,) each
    # Per-token means; clamp only guards the 0/0 of a response-free row.
    logits_mean = sums.logits_sums / (lengths.clamp(min=1) * vocab_size)  # (2B,)
    half = labels.shape[0] // slots
    pair = PairLogps(
        chosen_logps=logps[:half], rejected_logps=logps[half:2 * half],
        chosen_lengths=lengths[:half], rejected_lengths=lengths[half:2 * half],
        chosen_logits_mean=logits_mean[:half], rejected_logits_mean=logits_mean[half:2 * half],
        aux_loss=out.aux_loss if router_aux else None,
    )
    if ranked:  # (K·B,) slot by slot → (B, K)
        pair.slot_logps, pair.slot_lengths, pair.slot_logits_mean = (
            values.reshape(slots, half).T for values in (logps, lengths, logits_mean))
    if ld_alpha is not None:
        ld = length_desensitised(logps, sums.excess_logps, ld_alpha)
        pair.chosen_ld_logps, pair.rejected_ld_logps = ld[:half], ld[half:]
    if weighting:
        log_weights = sums.wpo_sums / lengths.clamp(min=1)
        pair.chosen_log_weights, pair.rejected_log_weights = log_weights[:half], log_weights[half:]
    return pair


def _model_inputs(model: nn.Module, batch: dict[str, torch.Tensor], mask: bool
                  ) -> tuple[dict, torch.Tensor | None, torch.Tensor]:
    """The model's inputs for `batch` (`concatenated_forward`'s), and for a packed or a
    shared-prompt batch the index that lays its outputs out as a padded batch's (else None), with
    the labels laid out as a padded batch's. `mask`: pass the real attention mask of a padded
    batch, not the mask-free fast path."""
    if "shared_pairs" in batch:  # [prompt | chosen | rejected] segments (dpo.data.shared_prompt)
        unwrapped = extract_model_from_parallel(model)
        # (the head's dtype: an adapter-off view has no `dtype` of its own)
        masks = attention_masks(unwrapped.config, batch["shared_pairs"], batch["position_ids"],
                                unwrapped.get_output_embeddings().weight.dtype)
        index, labels = unshare(batch["shared_pairs"], batch["labels"])
        return dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=masks), index, labels
    packed = batch.get("packed_sequences")
    if packed is None:
        attention_mask = batch["attention_mask"]
        return (dict(input_ids=batch["input_ids"], attention_mask=attention_mask if mask
                     else causal_attention_mask(attention_mask)), None, batch["labels"])
    # No attention mask and no cache: transformers then reads the sequences' boundaries off the
    # position ids, which restart at each one, and keeps them apart; sdpa does it sequence by
    # sequence instead of with a dense block mask (see dpo.model.packed_attention).
    use_packed_sdpa(extract_model_from_parallel(model))
    index, labels = _unpack(packed, batch["labels"])
    return dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"]), index, labels


def excess_tokens(labels: torch.Tensor) -> torch.Tensor:
    """`[2B, T]` bool, aligned with `labels` of a `[chosen; rejected]` batch: the response tokens
    past ℓ_p = min(|y⁺|, |y⁻|) of their pair, counting from each response's first token (the
    "excess" part of the longer response, LD-DPO). Empty for the shorter response of a pair.

    E.g. response labels at positions 2..6 in row i (|y⁺| = 5) and 3..5 in row B+i (|y⁻| = 3):
    ℓ_p = 3, and only positions 5 and 6 of row i are excess.
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # the positions the sums count (after the shift)
    rank = mask.cumsum(-1)  # 1 at a response's first token
    lengths = mask.sum(-1)
    half = labels.shape[0] // 2
    shorter = torch.minimum(lengths[:half], lengths[half:]).repeat(2)  # (2B,) ℓ_p of each pair
    excess = mask & (rank > shorter.unsqueeze(-1))
    return torch.nn.functional.pad(excess, (1, 0))


def _unpack(packed: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each sequence of a packed batch lies: `(index, labels)`, both `[2B, T]` (T the longest
    sequence). `index` points into the batch's flattened `[R·L]` positions, so that
    `packed_outputs.flatten(0, 1)[index]` lays the model's outputs out as a right-padded batch
    would (differentiably); `labels` are the sequences' labels, −100 beyond each one's end,
    where `index` points at position 0 of the batch, which no label reads.

    Everything downstream (the causal shift, the chunked head, the sums) then runs on the same
    layout as a padded batch, so each label is predicted from its own sequence only.
    """
    rows, starts, lengths = packed.unbind(-1)
    steps = torch.arange(int(lengths.max()), device=packed.device)  # one host sync
    inside = steps < lengths.unsqueeze(-1)  # [2B, T]
    index = torch.where(inside, (rows * labels.shape[1] + starts).unsqueeze(-1) + steps, 0)
    return index, labels.flatten()[index].masked_fill(~inside, IGNORE_INDEX)


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


class ChunkedHeadUnsupported(RuntimeError):
    """The chunked path cannot serve this model: no separate body to take the last hidden state
    from, or an LM head that is not an `nn.Linear`."""


class _Captured:
    hidden: torch.Tensor


@contextmanager
def _last_hidden_state(model: nn.Module) -> Iterator[_Captured]:
    """Within the block, record the `last_hidden_state` that the model's body (`base_model`: the
    decoder stack with its final norm, what the LM head is applied to) returns from its one call.

    A forward hook rather than a direct call of the body: the model is still called through its
    DDP/DeepSpeed wrapper, whose hooks must run.
    """
    body = getattr(model, "base_model", model)
    if body is model:
        raise ChunkedHeadUnsupported(f"{type(model).__name__} has no separate base model")
    outputs = []
    handle = body.register_forward_hook(lambda module, args, output: outputs.append(output))
    captured = _Captured()
    try:
        yield captured
    finally:
        handle.remove()
    hidden = [getattr(out, "last_hidden_state", None) for out in outputs]
    if len(hidden) != 1 or not isinstance(hidden[0], torch.Tensor):
        raise ChunkedHeadUnsupported(
            f"{type(body).__name__} returned {len(outputs)} output(s), not one with a "
            "last_hidden_state")
    captured.hidden = hidden[0]
