"""The Accelerator for this run: process group, trackers, and DeepSpeed's copy of our settings."""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from dpo.config import ConfigError, TrainConfig


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for whatever launched us: `python`, `accelerate launch` or `torchrun`.

    Without CUDA the process group must use gloo. Plain DDP gets it from `cpu=True`; DeepSpeed
    would be silently switched off by `cpu=True`, so it gets the backend named instead — and that
    handler, given to a run that no launcher started, breaks plain `python train.py`.
    """
    kwargs = {}
    if not torch.cuda.is_available():
        if _env_flag("ACCELERATE_USE_FSDP"):
            # Accelerate sets up FSDP on accelerators only: on CPU it would fall back to plain
            # DDP (with cpu=True) or to unconnected single processes (without).
            raise ConfigError("FSDP needs GPUs (accelerate does not set it up on CPU); on CPU "
                              "use DDP (--multi_gpu) or DeepSpeed (--use_deepspeed)")
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=os.path.join(cfg.output_dir, "runs")),
        **kwargs,
    )
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise ConfigError(f"{accelerator.num_processes} processes were launched but accelerate "
                          "connected none of them; check the launcher and its config")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would quietly run fp32 here (no autocast, no loss scaler): refuse instead.
        raise ConfigError("mixed_precision fp16 needs a GPU, where gradients are loss-scaled; "
                          "on CPU use --mixed_precision bf16 or no")
    warning = check_precision(cfg.dtype, accelerator.mixed_precision,
                              accelerator.distributed_type)
    if warning:
        accelerator.print(f"warning: {warning}")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, cfg)
    accelerator.print(f"distributed: {accelerator.distributed_type.value}, "
                      f"{accelerator.num_processes} process(es), mixed precision "
                      f"{accelerator.mixed_precision}, device {accelerator.device.type}")
    return accelerator


MODE_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # mixed precision → its weights' dtype


def check_precision(dtype: str, mixed_precision: str,
                    distributed_type: DistributedType) -> str | None:
    """A warning for `--dtype` weights that train without an fp32 master copy; ConfigError for
    combinations that cannot train.

    Accelerate's mixed precision keeps fp32 weights and computes in bf16/fp16 under autocast;
    DeepSpeed casts the weights to its bf16/fp16 mode itself and keeps fp32 master weights in its
    optimizer. `--dtype` below float32 outside DeepSpeed makes the trained weights themselves
    bf16/fp16, which AdamW then updates in that precision.
    """
    if distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed casts the parameters to its mode's dtype anyway and builds its fp32 master
        # weights from those: loading in that dtype only saves host memory. Another contradicts.
        if dtype not in ("float32", MODE_DTYPES.get(mixed_precision)):
            mode = {v: k for k, v in MODE_DTYPES.items()}[dtype]
            raise ConfigError(f"--dtype {dtype} under DeepSpeed needs its {mode} mode "
                              f"(--mixed_precision {mode}), which keeps fp32 master weights; "
                              "otherwise keep --dtype float32")
        return None
    if dtype == "float16" and mixed_precision == "fp16":
        # GradScaler refuses to unscale fp16 gradients (a traceback at the first step).
        raise ConfigError("--dtype float16 cannot train under --mixed_precision fp16: its loss "
                          "scaler needs fp32 weights; keep --dtype float32 (the default)")
    if dtype == "float16":
        return ("--dtype float16 trains pure fp16 weights with no fp32 master copy and no loss "
                "scaling: small gradients underflow to 0 and small updates vanish; for mixed "
                "precision keep --dtype float32 and pass --mixed_precision fp16 (GPU) or bf16")
    if dtype == "bfloat16":
        return ("--dtype bfloat16 trains pure bf16 weights with no fp32 master copy: an update "
                "smaller than ~1/256 of a weight is rounded away; for mixed precision keep "
                "--dtype float32 and pass --mixed_precision bf16")
    return None


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with torch's fused kernel.

    The fused kernel updates every parameter in one pass per tensor instead of a dozen `foreach`
    passes: for a 135M-parameter model on CPU, 0.03 s instead of 0.41 s per optimizer step.
    """
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                             lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)


def _configure_deepspeed(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Write our clipping, batch geometry and accumulation into DeepSpeed's config.

    DeepSpeed clips and accumulates inside its engine, so `accelerator.clip_grad_norm_` and our
    accumulation count only reach it through this config — whether it came from a JSON file
    or from `accelerate launch --use_deepspeed` flags.
    """
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if cfg.skip_nonfinite_steps:
        # Its step inside backward applies what was accumulated: we could not drop it.
        raise ConfigError("--skip-nonfinite-steps is not available under DeepSpeed, which "
                          "steps inside backward: a non-finite loss stops the run before that "
                          "step (the default), and DeepSpeed's fp16 loss scaler skips overflows")
    if "optimizer" in ds_config or "scheduler" in ds_config:
        raise ConfigError("the DeepSpeed config has an optimizer/scheduler section; remove it: "
                          "AdamW and the schedule come from --learning-rate/--lr-scheduler")
    ds_config["gradient_clipping"] = cfg.max_grad_norm
    ds_config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds_config["train_batch_size"] = (cfg.batch_size * cfg.gradient_accumulation_steps
                                     * accelerator.num_processes)
    zero = ds_config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # The final `save_pretrained` needs the full weights gathered from the shards; DeepSpeed
        # only allows that with this flag (off by default when set up by launch flags alone).
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def _env_flag(name: str) -> bool:
    """A true/false variable `accelerate launch` sets from its config (e.g. --use_deepspeed)."""
    return os.environ.get(name, "false").lower() == "true"
