"""The layout probes: do packed sequences, or pairs sharing their prompt, give the model the
log-probs that separate sequences get?

`check_padding_free` feeds seeded pairs through the model padded and packed in one row and
compares every response token's log-prob within the model's own measured rounding noise;
`check_shared_prompt` does the same with the shared-prompt layout. `dpo.model.probes.
settle_logps_path` runs them once, at start-up.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from dpo.model.forward import _last_hidden_state, _model_inputs
from dpo.model.logprobs import (IGNORE_INDEX, LogitsTransform, _call_as_forward, _chunked_head,
                                _token_logps)
from dpo.model.packed_attention import (PACKED_SDPA, PROBE_MARGIN, attention_span, probe_length,
                                        use_dense_mask)
from dpo.model.vision import image_inputs, probe_image, special_ids, vision_family


def check_padding_free(model: nn.Module, *, chunked: bool, device: torch.device | str | None = None,
                       max_length: int | None = None) -> str | None:
    """Do packed sequences give `model` the log-probs they get apart? None if so, else why not.

    Seeded probe pairs of random tokens, of different lengths, go through the model (eval mode,
    no gradient, `concatenated_forward`'s inputs and log-prob path) as a right-padded batch and
    packed in one row (`PreferenceCollator(padding_free=True)`), and the log-prob of every
    response token is compared, not their sums, which would dilute an error confined to a few
    tokens. An attention implementation that ignores the position ids' boundaries lets each
    sequence see the ones before it; so does a model that does not pass position ids down, or
    one whose positions do not restart. A model whose attention is limited (`attention_span`: a
    sliding window, attention chunks) gets a third pair of `probe_length` tokens, past the
    limit, its responses after it, which a packed path that drops the limit gets wrong. Every
    layer type of the model runs on every pair.

    The tolerance is the model's own rounding noise, measured: `PROBE_NUDGE_FACTOR` times the
    largest change of a token's log-prob when the padded batch runs again with its input
    embeddings nudged by one unit of the precision's rounding (`_nudged_inputs`), plus
    `PROBE_ATOL`. A different layout rounds differently, by no more than that; a dropped window
    or a leak moves tokens by nats (see `PROBE_NUDGE_FACTOR`).

    Under sdpa the packed batch runs on `packed_sdpa`; a model that then disagrees (its code
    asks for sdpa by name) is put back on transformers' sdpa (`use_dense_mask`) and probed
    again. Collective under ZeRO-3/FSDP: every process must call it, and takes the same path.

    Args:
        chunked: the log-prob path the run uses (`cfg.chunked_logps`, settled).
        max_length: the run's longest sequence (`cfg.max_length`), which caps the long pair.
    """
    return _check_layout(model, {"padding_free": True}, chunked, device, max_length,
                         "packed sequences'")


def check_shared_prompt(model: nn.Module, *, chunked: bool, padding_free: bool,
                        device: torch.device | str | None = None, max_length: int | None = None
                        ) -> str | None:
    """Does the shared-prompt layout (`dpo.data.shared_prompt`: each pair once as `[prompt |
    chosen | rejected]`, packed too with `padding_free`) give `model` the log-probs of separate
    sequences? None if so, else why not: `check_padding_free`'s probe pairs and tolerance, the
    shared layout in place of the packed one. A model that rebuilds or drops the 4-D masks the
    rule goes in, or loses the rejected response's position ids, lets a response see the other
    one or misplaces it, by nats; an attention implementation that takes no 4-D mask is named.
    Collective under ZeRO-3/FSDP, as `check_padding_free`."""
    from dpo.model.shared_prompt import SharedPromptUnsupported

    try:
        return _check_layout(model, {"share_prompt": True, "padding_free": padding_free},
                             chunked, device, max_length, "shared-prompt pairs'")
    except SharedPromptUnsupported as error:
        return str(error)


def _check_layout(model: nn.Module, layout: dict, chunked: bool, device, max_length: int | None,
                  what: str) -> str | None:
    """The probe of `check_padding_free` for the `PreferenceCollator` `layout`."""
    from dpo.data.batching import PreferenceCollator  # dpo.data imports the tokenizers

    unwrapped, _, vocab_size, generator = _probe_setup(model, None)
    family = vision_family(unwrapped)
    # (no sdpa-by-name retry for image blocks attending both ways: packing cannot serve them)
    bidirectional = family is not None and family.bidirectional
    rows, images = _probe_rows(unwrapped, max_length, vocab_size, generator)
    device = device if device is not None else next(unwrapped.parameters()).device
    padded, other = (_to({**PreferenceCollator(0, **kwargs)(rows), **images}, device)
                     for kwargs in ({}, layout))

    def compare() -> tuple[float, float]:
        want = _response_token_logps(model, padded, chunked)
        with _nudged_inputs(unwrapped):  # before the packed batch switches sdpa to packed_sdpa
            nudged = _response_token_logps(model, padded, chunked)
        got = _response_token_logps(model, other, chunked)
        noise = float((nudged - want).abs().max())
        return float((got - want).abs().max()), PROBE_NUDGE_FACTOR * noise + PROBE_ATOL

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _without_autocast(unwrapped):
            diff, tolerance = compare()
            if (diff > tolerance and unwrapped.config._attn_implementation == PACKED_SDPA
                    and "share_prompt" not in layout and not bidirectional):
                # A model that tests for sdpa by name: transformers' sdpa, with its block mask
                # (both layouts again: its padded path was not sdpa's under our name either).
                use_dense_mask(unwrapped)
                diff, tolerance = compare()
    finally:
        model.train(was_training)
    measured = (f"{what} token log-probs differ from separate ones' by up to {diff:.2g} "
                f"nats (tolerance {tolerance:.1g}: {PROBE_NUDGE_FACTOR}x its rounding noise + "
                f"{PROBE_ATOL:g})")
    if bidirectional:  # refused even if the probe pair agreed
        kind = "shared prompts" if layout.get("share_prompt") else "packed rows"
        return (f"{unwrapped.config.model_type}'s image tokens attend to each other both ways, "
                f"which {kind} cannot keep (their attention is causal only; {measured})")
    return None if diff <= tolerance else measured


# check_padding_free's tolerance: this many times the rounding noise, plus PROBE_ATOL nats.
# Measured on tiny random models (tests/test_forward_architectures.py; CPU, bf16): a correct
# packed layout moves a token by at most 0.6x the noise, a dropped window by >= 8x, a leak
# between sequences by >= 17x; in fp32 PROBE_ATOL sits between 1e-5 and >= 1.3 nats.
PROBE_NUDGE_FACTOR = 4
PROBE_ATOL = 1e-4


@contextmanager
def _nudged_inputs(model: nn.Module) -> Iterator[None]:
    """`model`'s (unwrapped) input embeddings scaled by 1 ± ε per hidden dimension (alternating
    signs, the same on every process), ε the relative rounding unit its matmuls work in: the
    dtype's, or TF32's / bf16's for fp32 weights where torch's matmul precision is lowered."""
    dtype = next(model.parameters()).dtype
    precision = torch.get_float32_matmul_precision()
    if dtype == torch.float32 and precision != "highest":
        dtype = torch.bfloat16 if precision == "medium" else None
    epsilon = 2.0 ** -10 if dtype is None else torch.finfo(dtype).eps

    def nudge(module, args, output):
        signs = 1 - 2 * (torch.arange(output.shape[-1], device=output.device) % 2)
        return output * (1 + epsilon * signs).to(output.dtype)

    handle = model.get_input_embeddings().register_forward_hook(nudge)
    try:
        yield
    finally:
        handle.remove()


def _probe_rows(model: nn.Module, max_length: int | None, vocab_size: int,
                generator: torch.Generator) -> tuple[list[dict], dict]:
    """`check_padding_free`'s tokenized probe pairs for `model` (unwrapped), and the batch keys
    of their images: a vision-language model's first pair holds one random image in its
    prompt (`dpo.model.vision.probe_image`), the others none."""
    pairs = [(12, 20, 9), (7, 14, 25)]
    longest = probe_length(model, max_length)
    if longest is not None:  # responses from just before the limit to past it
        span = attention_span(model.config)
        prompt = max(1, span - 8)
        chosen = min(span + PROBE_MARGIN, longest) - prompt
        pairs.append((prompt, chosen, max(1, longest - prompt - (longest == chosen + prompt))))
    rows, images, image = [], {}, []
    if special_ids(model.config):
        image, images = probe_image(model, generator)
        images["image_counts"] = torch.tensor([1] + [0] * (len(pairs) - 1))
    for prompt, chosen, rejected in pairs:
        row = {}
        ids = random_ids(model, vocab_size, prompt, generator)
        ids, image = ids[:prompt // 2] + image + ids[prompt // 2:], []  # the first pair's
        for side, length in (("chosen", chosen), ("rejected", rejected)):
            response = random_ids(model, vocab_size, length, generator)
            row[f"{side}_input_ids"] = ids + response
            row[f"{side}_labels"] = [IGNORE_INDEX] * len(ids) + response
        rows.append(row)
    return rows, images


def random_ids(model: nn.Module, vocab_size: int, count: int, generator: torch.Generator
               ) -> list[int]:
    """`count` random token ids below `vocab_size`, none of them a vision-language model's image
    or video token (`dpo.model.vision.special_ids`), which would need an image."""
    avoid = special_ids(extract_model_from_parallel(model).config)
    if not avoid:
        return torch.randint(vocab_size, (count,), generator=generator).tolist()
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in avoid if i < vocab_size]] = False
    allowed = allowed.nonzero().squeeze(1)
    return allowed[torch.randint(len(allowed), (count,), generator=generator)].tolist()


@contextmanager
def _without_autocast(model: nn.Module) -> Iterator[None]:
    """`model` (unwrapped) computing in its weights' dtype: Accelerate's mixed precision wraps its
    forward in autocast, under which padded and packed rows would take different half-precision
    kernels and differ by their rounding, far more than a tolerance that catches a leak between
    sequences allows."""
    autocast = model.__dict__.get("_original_forward")
    if autocast is None:
        yield
        return
    wrapped, model.forward = model.forward, autocast
    try:
        yield
    finally:
        model.forward = wrapped


def _to(batch: dict, device) -> dict:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _response_token_logps(model: nn.Module, batch: dict, chunked: bool) -> torch.Tensor:
    """log π(y_t) of every response token of `batch`, `(N,)` float32, in the order of a padded
    batch's labels (row by row) for a packed batch too: `concatenated_forward`'s inputs and
    log-prob path, before its sums."""
    unwrapped = extract_model_from_parallel(model)
    inputs, index, labels = _model_inputs(model, batch, False)
    if "pixel_values" in batch:
        inputs.update(image_inputs(model, batch, 2, index))
    if not chunked:
        logits = model(**inputs, use_cache=False).logits
        token_logps, mask = _token_logps(logits if index is None
                                         else logits.flatten(0, 1)[index], labels, IGNORE_INDEX)
        return token_logps[mask]
    with _last_hidden_state(unwrapped) as captured:
        model(**inputs, logits_to_keep=1, use_cache=False)
    hidden = captured.hidden if index is None else captured.hidden.flatten(0, 1)[index]
    mask = labels[:, 1:] != IGNORE_INDEX
    token_logps, _, _ = _call_as_forward(
        unwrapped.get_output_embeddings(), _chunked_head, hidden[:, :-1][mask],
        labels[:, 1:][mask], 16, LogitsTransform.from_config(unwrapped.config))
    return token_logps


def _probe_setup(model: nn.Module, rtol: float | None):
    """What both start-up probes share: the unwrapped model, the tolerance for its dtype (1e-4
    in fp32, else 1e-2), the vocabulary both embeddings cover, and a seeded generator."""
    unwrapped = extract_model_from_parallel(model)
    if rtol is None:
        rtol = 1e-4 if unwrapped.dtype == torch.float32 else 1e-2
    vocab_size = min(unwrapped.get_input_embeddings().num_embeddings,
                     unwrapped.get_output_embeddings().out_features)
    return unwrapped, rtol, vocab_size, torch.Generator().manual_seed(0)
