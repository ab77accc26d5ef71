"""The run section: the seed, what is logged and where to, checkpoints, and the output
directory."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from dpo.config.fields import ConfigError, _opt, check_at_least


@dataclass
class RunSection:
    """run and output: seed, logging, checkpoints, the output directory"""

    seed: int = _opt(42, "seed for data order, sampling and initialisation")
    logging_steps: int = _opt(10, "log metrics every N optimizer steps")
    save_steps: int | None = _opt(None, "save a resumable checkpoint every N optimizer steps")
    save_total_limit: int | None = _opt(None, "keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = _opt(None, "a checkpoint directory, or 'latest'")
    report_to: str = _opt("none", "tracker", choices=("none", "tensorboard", "wandb"))
    output_dir: str = _opt("outputs/dpo_qwen_trl", "where checkpoints, metrics and the model go")
    overwrite_output_dir: bool = _opt(False, "delete a non-empty output_dir first")

    def _validate_run(self) -> None:
        check_at_least(self, 1, "logging_steps", "save_steps", "save_total_limit")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ConfigError(f"report_to: {self.report_to} is not installed; "
                              f"pip install {self.report_to}, or use --report-to none")
