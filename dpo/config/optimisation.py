"""The optimisation section: how long, in what batches, with what AdamW and schedule, and the
chunked LM head that keeps the vocabulary projection small."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import SchedulerType

from dpo.config.fields import ConfigError, _opt, check_at_least


@dataclass
class OptimisationSection:
    """optimisation: steps, batch geometry, AdamW and its schedule, the chunked LM head"""

    epochs: int = _opt(1, "passes over the training data (--max-steps overrides)")
    max_steps: int | None = _opt(None, "optimizer steps to run, across epochs if needed")
    batch_size: int = _opt(2, "pairs per device per micro-batch")
    gradient_accumulation_steps: int = _opt(4, "micro-batches per optimizer step")
    learning_rate: float = _opt(5e-6, "peak learning rate of AdamW")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    lr_scheduler: str = _opt("linear", "any transformers.get_scheduler name",
                             choices=tuple(s.value for s in SchedulerType))
    warmup_ratio: float = _opt(0.0, "fraction of the steps spent warming up the learning rate")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (DeepSpeed: gradient_clipping); "
                                "0 = no clipping")
    skip_nonfinite_steps: bool = _opt(False, "skip (and count) an optimizer step whose loss or "
                                      "gradient is NaN/Inf instead of stopping the run")
    chunked_logps: bool = _opt(True, "project only response tokens on the vocab, in chunks")
    logps_chunk_size: int = _opt(256, "tokens per LM-head chunk on the chunked path")

    def _validate_optimisation(self) -> None:
        check_at_least(self, 1, "batch_size", "gradient_accumulation_steps", "epochs",
                       "max_steps", "logps_chunk_size")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        check_at_least(self, 0, "weight_decay", "max_grad_norm")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
