"""Loading the policy and the frozen reference, and placing the reference beside the policy."""
from __future__ import annotations

import copy
from itertools import chain
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase)

from dpo.config import ConfigError, TrainConfig
from dpo.config.model import adapter_base, is_adapter_dir, uses_peft
from dpo.data import prepare_tokenizer
from dpo.loss import needs_reference
from dpo.model.processors import is_vision_config, load_processor
from dpo.model.vision import family_of, freeze_vision_tower

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: TrainConfig, path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, ready for DPO (a pad token); ConfigError if `path` has none."""
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").is_file():
        path = adapter_base(path)  # an adapter saved without its tokenizer
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"model {path}: no such directory (give a local model directory "
                          "or a hub name)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {path}: cannot load its tokenizer: {_first_line(e)} (a local "
                          "directory needs the tokenizer files; a hub name needs network "
                          "access)") from None
    try:
        return prepare_tokenizer(tokenizer)
    except ValueError as e:
        raise ConfigError(f"model {path}: {e}") from None


def load_tokenizer_and_processor(cfg: TrainConfig, path: str):
    """`(tokenizer, processor)`: the processor of a vision-language model holds the very
    tokenizer returned (its pad token set), so that rows, batches and generation agree; None for
    a text-only model."""
    tokenizer = load_tokenizer(cfg, path)
    processor = load_processor(path, trust_remote_code=cfg.trust_remote_code)
    if processor is not None:
        processor.tokenizer = tokenizer
    return tokenizer, processor


def load_causal_lm(cfg: TrainConfig, path: str) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` with every dropout set to zero
    (`AutoModelForImageTextToText` for a vision-language model: its config has a vision_config).

    Dropout is off in both models: the DPO loss compares the policy's log-probs with the
    reference's, and random masks on either side would add noise to Δ (at init, π = π_ref must
    give exactly ln 2). Config fields are zeroed before loading so that attention dropout, which
    is a float on the attention module rather than an `nn.Dropout`, is off too.
    """
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {path}: cannot load its config: {_first_line(e)}") from None
    # a vision-language model's text and vision settings are sub-configs
    parts = [config, *(getattr(config, key) for key in getattr(config, "sub_configs", {}))]
    for part in filter(None, parts):
        for name, value in vars(part).items():
            if "dropout" in name and isinstance(value, float):
                setattr(part, name, 0.0)
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.load_in_4bit:  # QLoRA on CUDA (unverified: no GPU run yet)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    family_of(config)  # ConfigError for a vision-language family dpo does not support
    auto = AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM
    model = auto.from_pretrained(
        path, config=config, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
        **kwargs)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    # no KV cache in training; generation asks for it explicitly
    model.config.use_cache = model.config.get_text_config().use_cache = False
    if is_vision_config(config):
        # Loaded under ZeRO-3, transformers 5.25 keeps the legacy key renamings too, which
        # saving then undoes twice (`model.model.embed_tokens`). Without them saving reverts
        # the current mapping, the list a plain load keeps.
        model._weight_conversions = None
    return model


def load_policy_and_reference(
    cfg: TrainConfig, path: str
) -> tuple[PreTrainedModel, nn.Module | None]:
    """The trainable policy and the frozen reference, both initialised from `path` unless
    `--ref-model` names another reference; no reference for a reference-free loss (SimPO), so it
    costs no memory. With LoRA (`dpo.model.lora`) the policy is the model with its adapter and the
    reference, a view of it with the adapter off, adds no second model.

    The reference is loaded separately rather than deep-copied: under DeepSpeed ZeRO-3,
    `from_pretrained` partitions parameters as it loads them, which a copy would bypass.
    """
    from dpo.model import lora

    if uses_peft(cfg):
        policy, reference = lora.load_peft_policy(cfg, path, load_causal_lm)
    else:
        policy, reference = load_causal_lm(cfg, path), None
        if cfg.freeze_vision_tower:  # (with LoRA: left out of the adapter, frozen with the base)
            freeze_vision_tower(policy)
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing works with DDP's hooks and with inputs that need no
            # grad.
            policy.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    if not needs_reference(cfg.loss_type):
        return policy, None
    if cfg.ref_model is not None:
        reference = load_reference_model(cfg, path)
    elif reference is None:
        reference = load_causal_lm(cfg, path)
    reference.eval()
    reference.requires_grad_(False)
    return policy, reference


def load_reference_model(cfg: TrainConfig, model_path: str) -> PreTrainedModel:
    """`--ref-model`: a full model, or a PEFT adapter folder merged into its base; ConfigError
    unless its tokenizer is `--model`'s (the reference scores the policy's token ids)."""
    from dpo import demo

    from dpo.model import lora

    path = demo.resolve_model(cfg.ref_model)
    mine, theirs = load_tokenizer(cfg, model_path), load_tokenizer(cfg, path)
    if mine.get_vocab() != theirs.get_vocab() or \
            mine.all_special_tokens != theirs.all_special_tokens:
        raise ConfigError(f"ref_model {cfg.ref_model}: its tokenizer differs from --model's "
                          f"({len(theirs)} vs {len(mine)} tokens, or other ids or special "
                          "tokens); the reference must score the same token ids")
    if not is_adapter_dir(path):
        return load_causal_lm(cfg, path)
    return lora.merge_into_base(load_causal_lm(cfg, adapter_base(path)), path)


def prepare_reference(accelerator: Accelerator, reference: nn.Module | None) -> nn.Module | None:
    """Place the frozen reference the way the policy is distributed.

    - DeepSpeed ZeRO-3: the policy's weights are sharded across processes; a full replica of the
      reference would cost as much memory as the whole unsharded policy. So the reference becomes
      a DeepSpeed inference engine with the same ZeRO-3 config (no optimizer): its shards are
      gathered layer by layer during its forward, like the policy's.
    - FSDP (version 2): sharded with `fully_shard` like the policy (`shard_reference_fsdp2`),
      frozen, and kept out of the models accelerate checkpoints.
    - DDP, ZeRO-1/2 and one process: a plain replica on the device. It is never wrapped in DDP:
      it has no gradients to synchronise. Under ZeRO-1/2 it takes the dtypes DeepSpeed gave the
      policy's weights (bf16/fp16 mode).
    Call after `accelerator.prepare(policy, ...)`, so DeepSpeed's "auto" values are resolved.
    """
    from dpo.model.lora import AdapterOffReference

    state = accelerator.state
    if reference is None:
        return None
    if isinstance(reference, AdapterOffReference):
        accelerator.print("reference: the policy with its adapter off (no second model)")
        return reference  # it runs on the policy, placed and sharded by accelerate already
    if state.distributed_type == DistributedType.DEEPSPEED:
        ds_config = state.deepspeed_plugin.deepspeed_config
        if ds_config["zero_optimization"]["stage"] == 3:
            import deepspeed

            config = copy.deepcopy(ds_config)
            for key in ("optimizer", "scheduler"):
                config.pop(key, None)
            engine, *_ = deepspeed.initialize(model=reference, config=config)
            engine.eval()
            accelerator.print("reference: sharded, a DeepSpeed ZeRO-3 inference engine")
            return engine
        # DeepSpeed casts the policy's parameters to its bf16/fp16 mode and runs no autocast: a
        # reference left in fp32 would differ from the policy at step 0 (Δ ≠ 0, loss ≠ ln 2)
        # and take twice the memory. (The ZeRO-3 engine above casts it by the same config.)
        _cast_like(reference, accelerator.deepspeed_engine_wrapped.engine.module)
    elif state.distributed_type == DistributedType.FSDP:
        _refuse_fsdp1(accelerator)
        return shard_reference_fsdp2(accelerator, reference)
    accelerator.print(f"reference: a frozen replica on {accelerator.device.type} in every process")
    return reference.to(accelerator.device)


def check_reference_layout(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """ConfigError, before anything is loaded, for a layout the reference cannot be placed in."""
    if needs_reference(cfg.loss_type):
        _refuse_fsdp1(accelerator)
    if cfg.sync_ref_model and accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("sync_ref_model is not supported under FSDP yet (DDP and DeepSpeed "
                          "ZeRO-1/2/3 are); drop it or use DeepSpeed")


def _refuse_fsdp1(accelerator: Accelerator) -> None:
    # FSDP version 1 cannot be set up without a GPU (not even its plugin): its sharding of the
    # reference has never run here, so it is refused rather than shipped untested.
    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP and state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(f"FSDP version {state.fsdp_plugin.fsdp_version} cannot shard the "
                          "reference model: set fsdp_version: 2 (as configs/accelerate/fsdp.yaml "
                          "does), or use a reference-free loss")


def shard_reference_fsdp2(accelerator: Accelerator, reference: nn.Module) -> nn.Module:
    """The frozen reference sharded across the processes by FSDP2, as the policy is.

    accelerate's own `fsdp2_prepare_model` with the run's plugin: `fully_shard` on each
    transformer layer of the auto-wrap policy, on the input embedding and on the final norm +
    LM head, then on the root; the plugin's mixed precision, `reshard_after_forward` and CPU
    offload; with `cpu_ram_efficient_loading` (whose other processes loaded no weights) rank 0's
    weights are broadcast into the shards. No activation checkpointing: nothing is backpropagated.

    Not `accelerator.prepare_model(reference, evaluation_mode=True)`: that neither shards nor
    places a model under FSDP, and it appends it to `accelerator._models`, which `save_state`
    checkpoints and which would keep it alive after `--precompute-ref-logps` frees it.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = accelerator.state.fsdp_plugin
    reference = fsdp2_prepare_model(accelerator, reference)
    reference.eval()
    reference.requires_grad_(False)
    where = ("in CPU memory (offloaded)" if isinstance(plugin.cpu_offload, CPUOffloadPolicy)
             else f"on {accelerator.device.type}")
    accelerator.print(f"reference: sharded by FSDP2 across {accelerator.num_processes} processes "
                      f"{where}; frozen, not checkpointed")
    return reference


def _cast_like(reference: nn.Module, policy: nn.Module) -> None:
    """Give each parameter and buffer of the reference the dtype of the policy's namesake: the
    engine casts parameters only, and keeps some modules (and all buffers) in fp32."""
    dtypes = {name: t.dtype for name, t in chain(policy.named_parameters(),
                                                 policy.named_buffers())}
    for name, t in chain(reference.named_parameters(), reference.named_buffers()):
        t.data = t.data.to(dtypes[name])


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
