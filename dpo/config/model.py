"""The model section: which causal LM trains, in what dtype, against which reference, and
whether through a LoRA adapter (peft). What decides LoRA's settings lives here too, as plain
file checks, so that they are validated before anything loads: the loading is `dpo.model.lora`'s."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo.config.fields import ConfigError, _opt, check_at_least

PEFT_EXTRA = 'pip install -e ".[peft]"'
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str) -> bool:
    """Whether `path` is a local PEFT adapter folder (it holds `adapter_config.json`)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(path: str) -> str:
    """The base model an adapter folder names (`base_model_name_or_path`)."""
    return json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text())[
        "base_model_name_or_path"]


def uses_peft(cfg) -> bool:
    return bool(cfg.lora_r) or is_adapter_dir(cfg.model)


def peft_installed() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ModelSection:
    """model: the policy, its reference, and LoRA through peft (pip install -e ".[peft]"; the
    reference is then the policy with its adapter off)"""

    model: str = _opt("Qwen/Qwen3-0.6B", "hub name or local directory of a causal LM")
    dtype: str = _opt("float32", "weights' dtype; mixed precision comes from accelerate "
                      "(--mixed_precision bf16) and keeps fp32 master weights",
                      choices=("float32", "bfloat16", "float16"))
    attn_implementation: str | None = _opt(None, "e.g. sdpa, eager, flash_attention_2")
    trust_remote_code: bool = _opt(False, "run modelling code shipped with the model (trust it!)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass")
    freeze_vision_tower: bool = _opt(True, "a vision-language model's vision tower and "
                                     "projector stay frozen (false: trained; with LoRA, "
                                     "adapted); ignored for a text-only model")
    router_aux_loss_coef: float | None = _opt(None, "weight of a mixture-of-experts model's "
                                              "router load-balancing loss, added to the loss "
                                              "(default: the model config's; 0 = off)")
    ref_model: str | None = _opt(None, "reference model other than --model (hub name, local "
                                 "directory or PEFT adapter folder); same tokenizer required")
    lora_r: int = _opt(0, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: float = _opt(16.0, "LoRA scaling numerator (the update is alpha / r · BA)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA branch's input")
    lora_target_modules: list[str] | None = _opt(
        None, "module names to adapt (default: every linear layer of the body, peft's "
        "all-linear; never the LM head)")
    lora_modules_to_save: list[str] | None = _opt(
        None, "modules trained in full beside the adapter (never the LM head)")
    merge_adapter: bool = _opt(False, "also write the adapter merged into its base model to "
                               "<output_dir>/merged")
    load_in_4bit: bool = _opt(False, "QLoRA: the base model's weights in 4 bits (bitsandbytes, "
                              "CUDA only; unverified)")

    def _validate_model(self) -> None:
        check_at_least(self, 0, "router_aux_loss_coef")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        for name in ("lora_target_modules", "lora_modules_to_save"):
            for module in getattr(self, name) or []:
                if module == "lm_head" or module.endswith(".lm_head"):
                    raise ConfigError(f"{name}: {module!r} is the LM head, which is never "
                                      "adapted (the chunked log-probs read its weight "
                                      "directly); drop it")
            if getattr(self, name) and not self.lora_r:
                raise ConfigError(f"{name} is set but lora_r is 0: pass --lora-r to train an "
                                  "adapter")
        adapter_start = is_adapter_dir(self.model)
        if self.merge_adapter and not (self.lora_r or adapter_start):
            raise ConfigError("merge_adapter: there is no adapter to merge (pass --lora-r, or an "
                              "adapter folder as --model)")
        if self.load_in_4bit and not self.lora_r:
            raise ConfigError("load_in_4bit (QLoRA) needs --lora-r > 0: 4-bit weights are not "
                              "trained themselves")
        needs = (self.lora_r or adapter_start
                 or (self.ref_model and is_adapter_dir(self.ref_model)))
        if needs and not peft_installed():
            raise ConfigError(f"LoRA and PEFT adapters need the peft package: {PEFT_EXTRA}")
        if self.load_in_4bit and not torch.cuda.is_available():
            raise ConfigError("load_in_4bit needs a GPU: bitsandbytes' 4-bit weights run on "
                              "CUDA only; drop the flag (plain LoRA runs on CPU)")
