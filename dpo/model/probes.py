"""The start-up probes that decide the forward's path for the model at hand.

`settle_logps_path` runs them once, before training or evaluation: `check_chunked_head` (does the
chunked LM head give the model's own log-probs?), `check_padding_free` (do packed sequences give
what separate ones do? `dpo.model.padding_probe`) and `settle_router_aux` (a mixture of experts'
router loss). Each probe
feeds a seeded pair through `dpo.model.forward.concatenated_forward` both ways and compares.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel
from torch import nn

from dpo.config import ConfigError, TrainConfig
from dpo.model.forward import ChunkedHeadUnsupported, concatenated_forward
from dpo.model.logprobs import IGNORE_INDEX
from dpo.model.packed_attention import DENSE_MASK_ONLY, PACKED_SDPA, attention_span, probe_length
from dpo.model.padding_probe import (_probe_setup, check_padding_free, check_shared_prompt,
                                     random_ids)


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
    input_ids = torch.tensor(random_ids(unwrapped, vocab_size, 2 * length, generator)).view(2, -1)
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



def settle_logps_path(accelerator: Accelerator, cfg: TrainConfig, policy: nn.Module,
                      reference: nn.Module | None = None) -> TrainConfig:
    """`cfg` settled for the policy at hand: `router_aux_loss_coef` resolved (`settle_router_aux`),
    `chunked_logps` off if `check_chunked_head` rejects the policy's head (the warning printed
    once), `padding_free` and then `share_prompt` True or False (`_settle_padding_free`,
    `_settle_share_prompt`, for `reference` too, placed
    as it will run: the check stands for the policy's adapter-off view, which runs on the policy,
    not for a separate model). Every process takes the same path: under
    ZeRO-3 a process on the chunked path and one on the full path would call the sharded LM head
    unequally often.
    """
    cfg = settle_router_aux(cfg, extract_model_from_parallel(policy))
    cfg = _settle_chunked_head(accelerator, cfg, policy)
    cfg = _settle_padding_free(accelerator, cfg, policy, reference)
    return _settle_share_prompt(accelerator, cfg, policy, reference)


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
    for model, name in _probed_models(cfg, policy, reference):
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


def _settle_share_prompt(accelerator: Accelerator, cfg: TrainConfig, policy: nn.Module,
                         reference: nn.Module | None = None) -> TrainConfig:
    """`share_prompt` decided. Asked for (True): `check_shared_prompt` on the settled path (the
    run's padding_free and head), for the policy and a separate `reference` alike, and a
    ConfigError naming the model if the layout would change its log-probs. Left to us (None): on
    where it was measured to win (packed rows on CPU: 1.5x and 1.75x the pairs/s of packed separate
    sequences, bench/shared_prompt.py) and both checks pass; else off, in one line saying why.
    """
    if cfg.share_prompt is False:
        return cfg
    if cfg.share_prompt is None:
        why_not = _not_shared_by_default(accelerator, cfg)
        if why_not is not None:
            accelerator.print(f"shared-prompt batches: off ({why_not})")
            return dataclasses.replace(cfg, share_prompt=False)
    elif cfg.router_aux_loss_coef:
        raise ConfigError("share_prompt: the router loss of a mixture of experts would count "
                          "each prompt once, not twice as separate sequences do; drop "
                          "--share-prompt or pass --router-aux-loss-coef 0")
    for model, name in _probed_models(cfg, policy, reference):
        reason = check_shared_prompt(model, chunked=cfg.chunked_logps,
                                     padding_free=cfg.padding_free, device=accelerator.device,
                                     max_length=cfg.max_length)
        flags = accelerator.gather(torch.tensor([reason is not None], device=accelerator.device))
        if not flags.any():
            continue
        reason = reason or "so says another process"
        if cfg.share_prompt is None:
            accelerator.print(f"shared-prompt batches: off ({name} cannot share prompts: "
                              f"{reason})")
            return dataclasses.replace(cfg, share_prompt=False)
        raise ConfigError(f"share_prompt: {name} cannot share prompts: {reason}; drop "
                          "--share-prompt")
    accelerator.print("shared-prompt batches: on (each prompt computed once for all its "
                      "responses; --no-share-prompt lays them out apart)")
    return dataclasses.replace(cfg, share_prompt=True)


def _not_shared_by_default(accelerator: Accelerator, cfg: TrainConfig) -> str | None:
    """Why shared prompts stay off when left unset, before any probe; None if nothing says so.
    (A mixture of experts' router loss has kept the rows padded.)"""
    if not cfg.padding_free:
        return "measured only on packed rows; --share-prompt shares them in padded rows too"
    if accelerator.device.type != "cpu":
        return (f"not measured on {accelerator.device.type}, where packed rows run one "
                "variable-length kernel call; --share-prompt turns it on")
    return None


def _probed_models(cfg: TrainConfig, policy: nn.Module, reference: nn.Module | None
                   ) -> list[tuple[nn.Module, str]]:
    """The models a layout probe runs on, named: the policy, and a separate reference (an
    adapter-off view runs on the policy)."""
    from dpo.model.lora import AdapterOffReference  # peft lazily, not this module

    models = [(policy, type(extract_model_from_parallel(policy)).__name__)]
    if reference is not None and not isinstance(reference, AdapterOffReference):
        ref = type(extract_model_from_parallel(reference)).__name__
        models.append((reference, f"the reference {cfg.ref_model} ({ref})" if cfg.ref_model
                       else f"the reference ({ref})"))
    return models


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
