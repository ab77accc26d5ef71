"""LoRA through `peft`: the policy trains a low-rank adapter, the reference is the same model with
the adapter switched off, so one model sits in memory and only the adapter has optimizer state.

- `--lora-r R` adds a fresh adapter to `--model` (by default to every linear layer of the body,
  peft's "all-linear"); the reference is `--model` itself: the policy under `disable_adapter()`.
- `--model ADAPTER_DIR` (a PEFT adapter folder, e.g. from SFT) starts from that adapter. Without
  `--lora-r` it trains further and the reference is a frozen second copy of it on the same base
  (`AdapterOffReference` swaps to it); with `--lora-r` it is merged into its base first and a
  fresh adapter trains on top, the reference being the merged model (the new adapter off).

Either way the reference is the model the run starts from, as with full fine-tuning, and at step
0 the policy equals it exactly (peft initialises B = 0): loss ln 2, margins 0.

The LM head is never adapted: the chunked log-prob path (`dpo.model.logprobs`) multiplies the last
hidden state by the head's weight itself, so an adapter or a trained copy there would be ignored.
A start adapter that adapts it is merged into its base (`--lora-r`), never trained further.
What accelerate wraps and trains is the transformers model inside the `PeftModel` (its LoRA layers
in place), so `dpo.model.forward` sees the usual body and head; the `PeftModel` is kept beside it to
switch adapters and to save the adapter (`dpo.model.lora_save`).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from torch import nn

from dpo.config import ConfigError
from dpo.config.model import adapter_base, is_adapter_dir

DEFAULT_ADAPTER, REFERENCE_ADAPTER = "default", "reference"
_PEFT_ATTR = "_dpo_peft"  # the PeftModel, on the transformers model it wraps (not a submodule)


def _names(entry: str, module_name: str) -> bool:
    """Whether a target-module entry selects `module_name`, as peft matches them (the full name
    or a `.`-separated suffix of it)."""
    return entry == module_name or module_name.endswith("." + entry)


def head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def check_head_untouched(cfg, model: nn.Module) -> None:
    """ConfigError if a LoRA setting names this model's LM head (whatever it is called)."""
    name = head_name(model)
    for field in ("lora_target_modules", "lora_modules_to_save"):
        for entry in getattr(cfg, field) or []:
            if _names(entry, name):
                raise ConfigError(f"{field}: {entry!r} is this model's LM head ({name}), which "
                                  "is never adapted (the chunked log-probs read its weight "
                                  "directly); drop it")
    tied = getattr(model.config, "tie_word_embeddings", False)
    embed = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    if tied and any(_names(e, embed) for e in cfg.lora_modules_to_save or []):
        raise ConfigError(f"lora_modules_to_save: {embed} shares its weight with the LM head "
                          "(tied embeddings), which is never trained; drop it")


def lora_config(cfg, model: nn.Module | None = None):
    """peft's LoraConfig for `cfg`. For a vision-language `model` the vision tower and projector
    are excluded (`exclude_modules`) while `freeze_vision_tower` holds; with it false, peft's
    "all-linear" (or the named targets) reaches the tower's linear layers too, which then train
    through adapters like the language model's (Qwen2.5-VL's merger included; Gemma 3's
    projector, a bare weight rather than a linear layer, stays frozen)."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    if targets is None or targets == ["all-linear"]:
        targets = "all-linear"  # peft leaves the output layer out
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, modules_to_save=cfg.lora_modules_to_save,
                      exclude_modules=_vision_exclusion(cfg, model), bias="none",
                      task_type="CAUSAL_LM")


def _vision_exclusion(cfg, model: nn.Module | None) -> str | None:
    """A regex of a frozen vision tower's and projector's modules, as peft matches module
    names; None when there is nothing to exclude."""
    from dpo.model.vision import vision_modules

    if model is None or not cfg.freeze_vision_tower:
        return None
    names = [re.escape(name) for name, _ in vision_modules(model)]
    return rf"({'|'.join(names)})(\..*)?" if names else None


def load_peft_policy(cfg, model_path: str, load_causal_lm) -> tuple[nn.Module, nn.Module]:
    """`(policy, reference)`: the transformers model with its LoRA layers (what accelerate
    prepares and the optimizer trains) and the `AdapterOffReference` that views it.

    `model_path` is `--model` resolved (a builtin is built); `load_causal_lm(cfg, path)` loads a
    base model with dropout off. Under ZeRO-3 the base loads sharded, except when an adapter is
    merged into it first (merging needs whole weights; DeepSpeed shards it when it starts).
    """
    from peft import PeftModel, get_peft_model

    output_dir = Path(cfg.output_dir).expanduser().resolve()
    if is_adapter_dir(model_path):
        base_path = adapter_base(model_path)
        if cfg.lora_r:  # merge the start adapter, train a fresh one on top
            with whole_weights():
                base = merge_into_base(load_causal_lm(cfg, base_path), model_path)
            peft_model, reference_adapter = _add_adapter(cfg, base, get_peft_model), None
            base_name, save_base = str(output_dir / "base"), True
        else:  # train the start adapter further; a frozen copy of it is the reference
            base = load_causal_lm(cfg, base_path)
            _prepare_base(cfg, base)
            peft_model = PeftModel.from_pretrained(base, model_path, is_trainable=True)
            _check_adapter_leaves_head(model_path, peft_model)
            peft_model.load_adapter(model_path, adapter_name=REFERENCE_ADAPTER,
                                    is_trainable=False)
            reference_adapter = REFERENCE_ADAPTER
            base_name, save_base = base_path, False
    else:
        base = load_causal_lm(cfg, model_path)
        peft_model, reference_adapter = _add_adapter(cfg, base, get_peft_model), None
        from dpo.demo import BUILTIN_CHAT_MODEL, BUILTIN_MODEL

        if cfg.model in (BUILTIN_MODEL, BUILTIN_CHAT_MODEL):  # built in a cache: saved beside
            base_name, save_base = str(output_dir / "base"), True
        elif Path(cfg.model).expanduser().is_dir():
            base_name, save_base = str(Path(cfg.model).expanduser().resolve()), False
        else:
            base_name, save_base = cfg.model, False
    peft_model.peft_config[DEFAULT_ADAPTER].base_model_name_or_path = base_name
    peft_model.dpo_save_base = save_base  # read by save_adapter
    model = peft_model.get_base_model()
    if not isinstance(model.get_output_embeddings(), nn.Linear):  # peft wrapped it after all
        raise RuntimeError("the LM head was adapted; it must stay a plain nn.Linear")
    object.__setattr__(model, _PEFT_ATTR, peft_model)
    return model, AdapterOffReference(peft_model, reference_adapter)


def _check_adapter_leaves_head(path: str, peft_model) -> None:
    """ConfigError if the start adapter adapts the LM head (a LoRA on it, or a trained copy in
    `modules_to_save`): trained further, the policy's head and the reference's would be two
    adapter copies, and the chunked log-probs read one plain head's weight. Merged into its base
    (`--lora-r`, or a merged model as --model), the adapter's head is that plain head."""
    model = peft_model.get_base_model()
    if isinstance(model.get_output_embeddings(), nn.Linear):
        return
    name, config = head_name(model), peft_model.peft_config[DEFAULT_ADAPTER]
    field = ("modules_to_save" if any(_names(e, name) for e in config.modules_to_save or [])
             else "target_modules")
    raise ConfigError(f"model {path}: the adapter adapts the LM head ({name}, in its {field}), "
                      "which is never trained further here (the chunked log-probs read the "
                      "head's weight directly); pass --lora-r R to merge the adapter into its "
                      "base and train a new adapter on top, or pass the merged model as --model")


def merge_into_base(base: nn.Module, path: str) -> nn.Module:
    """`base` with the adapter folder `path` merged in (`merge_and_unload`), head included.

    A head tied to the input embeddings is untied for the merge: a LoRA on the head (or a
    trained copy of it, or of the embeddings) would otherwise be written into both, while the
    adapter changes one. They are tied again if the adapter left them equal.
    """
    from peft import PeftModel

    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    tied = head.weight is embed.weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone())
    model = PeftModel.from_pretrained(base, path).merge_and_unload()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if tied and torch.equal(head.weight, embed.weight):
        head.weight = embed.weight
    else:  # saved and loaded as two weights, as they are now
        model.config.tie_word_embeddings = False
    return model


def _prepare_base(cfg, base: nn.Module) -> None:
    check_head_untouched(cfg, base)
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad; peft still makes the
        # embeddings' output require it (enable_input_require_grads) for reentrant variants.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _add_adapter(cfg, base: nn.Module, get_peft_model):
    _prepare_base(cfg, base)
    # Seeded by set_seed before loading: every process draws the same initial A.
    return get_peft_model(base, lora_config(cfg, base))


@contextlib.contextmanager
def whole_weights():
    """Build and load models with whole weights, also under ZeRO-3: transformers partitions
    every model it builds (`zero.Init`, a collective) while a ZeRO-3 config is registered, and
    accelerate registers one whatever `zero3_init_flag` says. Unregistered for the block."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def peft_of(model: nn.Module):
    """The `PeftModel` around a transformers model made by `load_peft_policy`, else None."""
    return model.__dict__.get(_PEFT_ATTR)


class AdapterOffReference(nn.Module):
    """The frozen reference as a view of the LoRA policy: calling it runs the policy's model
    with the adapter disabled (or, for an adapter start without a new adapter, with the frozen
    reference adapter active), in eval mode, and restores the policy afterwards.

    It owns no parameters (the model is held outside `nn.Module`'s registry), so nothing is
    copied, placed, sharded or checkpointed twice: it runs on whatever accelerate made of the
    policy (a DDP replica, ZeRO-2 replica, ZeRO-3 shards, whose module hooks gather them). Use it
    only under `torch.no_grad()`, as the reference always is: switching adapters toggles
    `requires_grad` on the adapter's weights for the duration of the call.
    """

    def __init__(self, peft_model, reference_adapter: str | None = None):
        super().__init__()
        object.__setattr__(self, "_peft", peft_model)
        object.__setattr__(self, "_model", peft_model.get_base_model())
        self.reference_adapter = reference_adapter
        self.eval()

    @contextlib.contextmanager
    def active(self):
        """Within the block, the policy's model computes the reference."""
        was_training = self._model.training
        self._model.eval()  # LoRA dropout off, as dropout everywhere else
        try:
            if self.reference_adapter is None:
                with self._peft.disable_adapter():
                    yield
            else:
                self._peft.base_model.set_adapter(self.reference_adapter, inference_mode=True)
                try:
                    yield
                finally:
                    self._peft.base_model.set_adapter(DEFAULT_ADAPTER)
        finally:
            self._model.train(was_training)

    def forward(self, *args, **kwargs):
        with self.active():
            return self._model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.active():
            return self._model.generate(*args, **kwargs)

    # What dpo.model.forward reads off a model: its body (hooked for the last hidden state), its
    # head and its config.
    @property
    def base_model(self) -> nn.Module:
        return self._model.base_model

    @property
    def config(self):
        return self._model.config

    @property
    def dtype(self) -> torch.dtype:  # what generation casts a vision model's pixel values to
        return self._model.dtype

    def get_output_embeddings(self) -> nn.Module:
        return self._model.get_output_embeddings()
