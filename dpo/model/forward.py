"""One model call for both halves of a preference batch.

The collator stacks each batch as `[chosen; rejected]`: rows `0..B-1` hold the chosen responses and
rows `B..2B-1` the rejected ones, row `i` and row `B+i` being the same pair. Running the model once
on all `2B` rows instead of twice on `B` halves the number of forward calls, keeps the matmuls
large, and — under DDP and ZeRO — means one forward per backward, which their hooks expect.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel
from torch import nn

from dpo.config import ConfigError, TrainConfig
from dpo.model.logprobs import IGNORE_INDEX, LogitsTransform, chunked_response_sums, response_sums
from dpo.loss.variants import length_desensitised
from dpo.model.packed_attention import (DENSE_MASK_ONLY, PACKED_SDPA, PROBE_MARGIN, attention_span,
                                  probe_length, use_dense_mask, use_packed_sdpa)


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
            results are laid out as for a padded batch.
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
    labels = batch["labels"]
    packed = batch.get("packed_sequences")  # (2B, 3): a padding-free batch (PreferenceCollator)
    if packed is None:
        mask = batch["attention_mask"]
        inputs = dict(input_ids=batch["input_ids"], attention_mask=mask if router_aux or full_mask
                      else causal_attention_mask(mask))
    else:
        # No attention mask and no cache: transformers then reads the sequences' boundaries off
        # the position ids, which restart at each one, and keeps them apart; sdpa does it
        # sequence by sequence instead of with a dense block mask (see dpo.model.packed_attention).
        use_packed_sdpa(extract_model_from_parallel(model))
        inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        index, labels = _unpack(packed, labels)
    if labels.shape[0] % 2:
        raise ValueError(f"a [chosen; rejected] batch has an even number of rows, got "
                         f"{labels.shape[0]}")
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
        hidden = captured.hidden if packed is None else captured.hidden.flatten(0, 1)[index]
        sums = chunked_response_sums(hidden, lm_head, labels, IGNORE_INDEX, chunk_size,
                                     LogitsTransform.from_config(unwrapped.config), **options)
        vocab_size = lm_head.out_features
    else:
        out = model(**inputs, use_cache=False, **extra)
        logits = out.logits  # [2B, T, V], packed [R, L, V]
        if packed is not None:
            logits = logits.flatten(0, 1)[index]
        sums = response_sums(logits, labels, IGNORE_INDEX, **options)
        vocab_size = logits.shape[-1]

    logps, lengths = sums.logps, sums.counts  # (2B,) each
    # Per-token means; clamp only guards the 0/0 of a response-free row.
    logits_mean = sums.logits_sums / (lengths.clamp(min=1) * vocab_size)  # (2B,)
    half = labels.shape[0] // 2
    pair = PairLogps(
        chosen_logps=logps[:half], rejected_logps=logps[half:],
        chosen_lengths=lengths[:half], rejected_lengths=lengths[half:],
        chosen_logits_mean=logits_mean[:half], rejected_logits_mean=logits_mean[half:],
        aux_loss=out.aux_loss if router_aux else None,
    )
    if ld_alpha is not None:
        ld = length_desensitised(logps, sums.excess_logps, ld_alpha)
        pair.chosen_ld_logps, pair.rejected_ld_logps = ld[:half], ld[half:]
    if weighting:
        log_weights = sums.wpo_sums / lengths.clamp(min=1)
        pair.chosen_log_weights, pair.rejected_log_weights = log_weights[:half], log_weights[half:]
    return pair


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


def check_chunked_head(model: nn.Module, *, device: torch.device | str | None = None,
                       rtol: float | None = None, length: int = 64) -> str | None:
    """Does the chunked path give `model`'s own log-probs? None if so, else one warning line.

    One seeded probe pair of `length` random tokens (the rejected row right-padded, half of each
    row response) goes through `concatenated_forward` twice, without gradient and in eval mode:
    on the model's full logits, and on the chunked head. The chunked head redoes the logit
    transforms it knows (`LogitsTransform`); a model that does something else after its LM head,
    or whose body hides its last hidden state, is caught here instead of training on wrong
    log-probs. Collective under ZeRO-3/FSDP: every process must call it.

    Args:
        model: the policy, possibly wrapped (DDP, DeepSpeed, FSDP).
        device: where the probe's inputs go; default that of the model's first parameter.
        rtol: largest relative difference of the summed log-probs that passes. Default: 1e-4
            for fp32 weights; 1e-2 otherwise, above 16-bit rounding of the logits (on either
            path), far below what any logit scaling or capping changes.
    """
    unwrapped, rtol, vocab_size, generator = _probe_setup(model, rtol)
    input_ids = torch.randint(vocab_size, (2, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :length // 2] = IGNORE_INDEX
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -length // 4:] = 0
    labels[1, -length // 4:] = IGNORE_INDEX
    device = device if device is not None else next(unwrapped.parameters()).device
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
             "labels": labels.to(device)}

    arch = f"{type(unwrapped).__name__} ({unwrapped.config.model_type})"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = concatenated_forward(model, batch, chunked=False)
            try:
                chunked = concatenated_forward(model, batch, chunked=True, chunk_size=length // 4)
            except ChunkedHeadUnsupported as e:
                reason = str(e)
            else:
                want = torch.cat([full.chosen_logps, full.rejected_logps])
                got = torch.cat([chunked.chosen_logps, chunked.rejected_logps])
                diff = float(((got - want).abs() / want.abs().clamp(min=1e-6)).max())
                if diff <= rtol:
                    return None
                reason = (f"its summed log-probs differ from its own logits' by {diff:.1e} "
                          f"relative (tolerance {rtol:.0e}): its logits are not lm_head of its "
                          "body's last hidden state, nor a known transform of that")
    finally:
        model.train(was_training)
    return (f"warning: chunked log-probs are not available for {arch}: {reason}; computing "
            "the full logits instead (chunked_logps off)")


def check_padding_free(model: nn.Module, *, chunked: bool, device: torch.device | str | None = None,
                       rtol: float | None = None, max_length: int | None = None) -> str | None:
    """Do packed sequences give `model` the log-probs they get apart? None if so, else why not.

    Seeded probe pairs of random tokens, of different lengths, go through `concatenated_forward`
    (eval mode, no gradient) as a right-padded batch and packed in one row
    (`PreferenceCollator(padding_free=True)`). An attention implementation that ignores the
    position ids' boundaries lets each sequence see the ones before it, and its log-probs move
    far beyond rounding; so does a model that does not pass position ids down, or one whose
    positions do not restart. A model whose attention is limited (`attention_span`: a sliding
    window, attention chunks) gets a third pair of `probe_length` tokens, past the limit, its
    responses after it, which a packed path that drops the limit gets wrong. Every layer type of
    the model runs on every pair. Under sdpa the packed batch runs on `packed_sdpa`; a model that
    then disagrees (its code asks for sdpa by name) is put back on transformers' sdpa
    (`use_dense_mask`) and probed again. Collective under ZeRO-3/FSDP: every process must call
    it, and takes the same path.

    Args:
        chunked: the log-prob path the run uses (`cfg.chunked_logps`, settled).
        rtol: as for `check_chunked_head`: 1e-4 for fp32 weights, 1e-2 otherwise.
        max_length: the run's longest sequence (`cfg.max_length`), which caps the long pair.
    """
    from dpo.data.batching import PreferenceCollator  # dpo.data imports the tokenizers

    unwrapped, rtol, vocab_size, generator = _probe_setup(model, rtol)
    pairs = [(12, 20, 9), (7, 14, 25)]
    longest = probe_length(unwrapped, max_length)
    if longest is not None:  # responses from just before the limit to past it
        span = attention_span(unwrapped.config)
        prompt = max(1, span - 8)
        chosen = min(span + PROBE_MARGIN, longest) - prompt
        pairs.append((prompt, chosen, max(1, longest - prompt - (longest == chosen + prompt))))
    rows = []
    for prompt, chosen, rejected in pairs:
        row = {}
        ids = torch.randint(vocab_size, (prompt,), generator=generator).tolist()
        for side, length in (("chosen", chosen), ("rejected", rejected)):
            response = torch.randint(vocab_size, (length,), generator=generator).tolist()
            row[f"{side}_input_ids"] = ids + response
            row[f"{side}_labels"] = [IGNORE_INDEX] * prompt + response
        rows.append(row)
    device = device if device is not None else next(unwrapped.parameters()).device
    batches = [_to(PreferenceCollator(0, padding_free=packed)(rows), device)
               for packed in (False, True)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _without_autocast(unwrapped):
            want, got = (_summed_logps(model, batch, chunked) for batch in batches)
            diff = _max_relative_difference(got, want)
            if diff > rtol and unwrapped.config._attn_implementation == PACKED_SDPA:
                # A model that tests for sdpa by name: transformers' sdpa, with its block mask
                # (both layouts again: its padded path was not sdpa's under our name either).
                use_dense_mask(unwrapped)
                want, got = (_summed_logps(model, batch, chunked) for batch in batches)
                diff = _max_relative_difference(got, want)
    finally:
        model.train(was_training)
    if diff <= rtol:
        return None
    return (f"packed sequences' summed log-probs differ from separate ones' by {diff:.1e} "
            f"relative (tolerance {rtol:.0e})")


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


def _summed_logps(model: nn.Module, batch: dict, chunked: bool) -> torch.Tensor:
    out = concatenated_forward(model, batch, chunked=chunked, chunk_size=16)
    return torch.cat([out.chosen_logps, out.rejected_logps])


def _max_relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want).abs() / want.abs().clamp(min=1e-6)).max())


def settle_logps_path(accelerator: Accelerator, cfg: TrainConfig, policy: nn.Module,
                      reference: nn.Module | None = None) -> TrainConfig:
    """`cfg` settled for the policy at hand: `router_aux_loss_coef` resolved (`settle_router_aux`),
    `chunked_logps` off if `check_chunked_head` rejects the policy's head (the warning printed
    once), and `padding_free` True or False (`_settle_padding_free`, for `reference` too, placed
    as it will run: the check stands for the policy's adapter-off view, which runs on the policy,
    not for a separate model). Every process takes the same path: under
    ZeRO-3 a process on the chunked path and one on the full path would call the sharded LM head
    unequally often.
    """
    cfg = settle_router_aux(cfg, extract_model_from_parallel(policy))
    cfg = _settle_chunked_head(accelerator, cfg, policy)
    return _settle_padding_free(accelerator, cfg, policy, reference)


def _settle_padding_free(accelerator: Accelerator, cfg: TrainConfig, policy: nn.Module,
                         reference: nn.Module | None = None) -> TrainConfig:
    """`padding_free` decided. Asked for (True): `check_padding_free` on the settled path, for
    the policy and a separate `reference` alike (a `--ref-model` may be another class), and a
    ConfigError (on every process) naming the model if packing would change its log-probs. Left
    to us (None): on where it was measured to win (sdpa: packed rows run `packed_sdpa`, 1.4× the
    tokens/s of padded batches on CPU, 1.5× on an H100) and both checks pass; else off, in one
    line saying why.
    """
    if cfg.padding_free is False:
        return cfg
    unwrapped = extract_model_from_parallel(policy)
    if cfg.padding_free is None:
        why_not = _not_by_default(cfg, unwrapped)
        if why_not is not None:
            accelerator.print(f"padding-free batches: off ({why_not})")
            return dataclasses.replace(cfg, padding_free=False)
    from dpo.model.lora import AdapterOffReference  # peft lazily, not this module

    models = [(policy, type(unwrapped).__name__)]
    if reference is not None and not isinstance(reference, AdapterOffReference):
        ref = type(extract_model_from_parallel(reference)).__name__
        models.append((reference, f"the reference {cfg.ref_model} ({ref})" if cfg.ref_model
                       else f"the reference ({ref})"))
    for model, name in models:
        # Read before the probe, which switches sdpa to packed_sdpa.
        implementation = extract_model_from_parallel(model).config._attn_implementation
        # Outside autocast (see _without_autocast): the tightest comparison.
        reason = check_padding_free(model, chunked=cfg.chunked_logps, device=accelerator.device,
                                    max_length=cfg.max_length)
        flags = accelerator.gather(torch.tensor([reason is not None], device=accelerator.device))
        if not flags.any():
            continue
        reason = reason or "so says another process"
        if cfg.padding_free is None:
            accelerator.print(f"padding-free batches: off ({name} does not keep packed "
                              f"sequences apart: {reason})")
            return dataclasses.replace(cfg, padding_free=False)
        raise ConfigError(
            f"padding_free: {name} with attn_implementation {implementation} does not keep "
            f"packed sequences apart: {reason}; use sdpa, eager or flex_attention, or drop "
            "--padding-free")
    if cfg.padding_free is None:
        longest = probe_length(unwrapped, cfg.max_length)
        probed = "" if longest is None else (
            f", probed at {longest} tokens past its {attention_span(unwrapped.config)}-token "
            "attention window")
        accelerator.print(f"padding-free batches: on (rows of up to "
                          f"{cfg.padding_free_max_tokens} tokens{probed}; --no-padding-free pads)")
    return dataclasses.replace(cfg, padding_free=True)


def _not_by_default(cfg: TrainConfig, model: nn.Module) -> str | None:
    """Why packing stays off when left unset, before any probe; None if nothing says so."""
    implementation = model.config._attn_implementation
    if implementation not in ("sdpa", PACKED_SDPA) or type(model) in DENSE_MASK_ONLY:
        return f"attn_implementation {implementation}, measured only with sdpa"
    if cfg.router_aux_loss_coef:
        return "a mixture of experts' router loss needs the attention mask"
    if cfg.max_length > cfg.padding_free_max_tokens:
        return (f"max_length {cfg.max_length} exceeds padding_free_max_tokens "
                f"{cfg.padding_free_max_tokens}")
    return None


def _settle_chunked_head(accelerator: Accelerator, cfg: TrainConfig, policy: nn.Module
                         ) -> TrainConfig:
    if not cfg.chunked_logps:
        return cfg
    # Under mixed precision the model's own head runs under autocast, the chunked one in fp32.
    warning = check_chunked_head(policy, device=accelerator.device,
                                 rtol=None if accelerator.mixed_precision == "no" else 1e-2)
    flags = accelerator.gather(torch.tensor([warning is not None], device=accelerator.device))
    if not flags.any():
        return cfg
    accelerator.print(warning or "warning: chunked log-probs disagree with the model's logits "
                      "on another process; computing the full logits instead")
    return dataclasses.replace(cfg, chunked_logps=False)


def settle_router_aux(cfg: TrainConfig, model: nn.Module) -> TrainConfig:
    """`cfg` with `router_aux_loss_coef` set for `model`: for a mixture of experts (a model whose
    forward takes `output_router_logits` and whose config has `router_aux_loss_coef`) the
    config's value unless one was given; for a dense model `cfg` as it is (None or 0: no router
    loss), and a ConfigError if a non-zero one was given."""
    coef = getattr(model.config, "router_aux_loss_coef", None)
    moe = (coef is not None
           and "output_router_logits" in inspect.signature(type(model).forward).parameters)
    if moe:
        if cfg.router_aux_loss_coef is None:
            cfg = dataclasses.replace(cfg, router_aux_loss_coef=float(coef))
        if cfg.padding_free and cfg.router_aux_loss_coef:
            # A packed row gets no attention mask, so the padding at the end of its shorter rows
            # would enter the balance.
            raise ConfigError("padding_free: the router loss of a mixture of experts needs the "
                              "attention mask that packed rows go without; drop --padding-free "
                              "or pass --router-aux-loss-coef 0")
        return cfg
    if cfg.router_aux_loss_coef:
        raise ConfigError(f"router_aux_loss_coef: {type(model).__name__} is not a mixture of "
                          "experts (it has no router); drop the flag")
    return cfg


def _probe_setup(model: nn.Module, rtol: float | None):
    """What both start-up probes share: the unwrapped model, the tolerance for its dtype (1e-4
    in fp32, else 1e-2), the vocabulary both embeddings cover, and a seeded generator."""
    unwrapped = extract_model_from_parallel(model)
    if rtol is None:
        rtol = 1e-4 if unwrapped.dtype == torch.float32 else 1e-2
    vocab_size = min(unwrapped.get_input_embeddings().num_embeddings,
                     unwrapped.get_output_embeddings().out_features)
    return unwrapped, rtol, vocab_size, torch.Generator().manual_seed(0)


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
