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
    refuses `cpu=True` and needs the backend named instead — and that handler, given to a run
    that no launcher started, breaks plain `python train.py`, hence the three cases.
    """
    kwargs = {}
    if not torch.cuda.is_available():
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
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
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, cfg)
    return accelerator


def _configure_deepspeed(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Write our clipping, batch geometry and accumulation into DeepSpeed's config.

    DeepSpeed clips and accumulates inside its engine, so `accelerator.clip_grad_norm_` and our
    accumulation count only reach it through this config — whether it came from a JSON file
    or from `accelerate launch --use_deepspeed` flags.
    """
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if "optimizer" in ds_config or "scheduler" in ds_config:
        raise ConfigError("the DeepSpeed config has an optimizer/scheduler section; remove it: "
                          "AdamW and the schedule come from --learning-rate/--lr-scheduler")
    ds_config["gradient_clipping"] = cfg.max_grad_norm
    ds_config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds_config["train_batch_size"] = (cfg.batch_size * cfg.gradient_accumulation_steps
                                     * accelerator.num_processes)
