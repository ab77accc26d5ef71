"""Saving a LoRA run's result: the adapter, the base it names when the base was built in memory,
and with ``--merge-adapter`` the adapter merged into that base.

Its own module because saving is done once, at the end (``dpo.train.checkpoint.save_final``),
and rebuilds the base from the policy's state dict, which may be gathered from ZeRO-3 shards;
nothing here shapes what a step computes. ``dpo.model.lora`` makes the adapter it saves.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from dpo.model.lora import DEFAULT_ADAPTER, head_name, peft_of, whole_weights


def save_adapter(accelerator, policy, tokenizer, output_dir: Path, merge: bool) -> None:
    """Write the adapter (`adapter_model.safetensors`, `adapter_config.json`) and tokenizer to
    `output_dir`, loadable with `AutoPeftModelForCausalLM.from_pretrained(output_dir)`; a base
    built in memory (a builtin model, or an adapter merged into its base) to `output_dir/base`,
    named by the adapter config; with `merge`, the adapter merged into its base to
    `output_dir/merged` (`AutoModelForCausalLM.from_pretrained`).

    Collective (every process must call it): `get_state_dict` gathers ZeRO-3 shards.
    """
    state_dict = accelerator.get_state_dict(policy)
    if accelerator.is_main_process:
        _write_adapter(accelerator, policy, state_dict, tokenizer, output_dir, merge)
    # The others wait: one leaving early, while the main process still builds the base and the
    # merged model, can tear the process group down under it.
    accelerator.wait_for_everyone()


def _write_adapter(accelerator, policy, state_dict, tokenizer, output_dir: Path, merge: bool):
    model = accelerator.unwrap_model(policy)
    peft_model = peft_of(model)
    prefixed = {f"base_model.model.{k}": v for k, v in state_dict.items()}
    peft_model.save_pretrained(output_dir, state_dict=prefixed, safe_serialization=True,
                               selected_adapters=[DEFAULT_ADAPTER], save_embedding_layers=False)
    tokenizer.save_pretrained(output_dir)
    if not (peft_model.dpo_save_base or merge):
        return
    with whole_weights():
        base = _base_from_state_dict(model.config, state_dict)
    if peft_model.dpo_save_base:
        base_dir = output_dir / "base"
        shutil.rmtree(base_dir, ignore_errors=True)
        base.save_pretrained(base_dir, safe_serialization=True)
        tokenizer.save_pretrained(base_dir)
    if merge:
        from peft import PeftModel

        merged = PeftModel.from_pretrained(base, output_dir).merge_and_unload()
        merged.save_pretrained(output_dir / "merged", safe_serialization=True)
        tokenizer.save_pretrained(output_dir / "merged")


def _base_from_state_dict(config, state_dict: dict) -> nn.Module:
    """The model without its adapters, from the policy's full state dict: LoRA weights dropped,
    `base_layer` and `original_module` (the untrained originals of `modules_to_save`) renamed
    back, the trained copies of `modules_to_save` dropped."""
    from transformers import AutoModelForCausalLM

    weights = {}
    for key, value in state_dict.items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        weights[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    dtype = next(iter(weights.values())).dtype
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = base.load_state_dict(weights, strict=False)
    tied = {k for k in missing if base.get_output_embeddings() is not None and k.startswith(
        head_name(base)) and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"base weights do not fit the model: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    return base
