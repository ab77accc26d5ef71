"""`TrainConfig`, the one schema: the sections' fields side by side as flat attributes
(`cfg.beta`), each section validated by its own `_validate_<section>`, then the checks that
span sections."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from dpo.config.data import DataSection
from dpo.config.evaluation import EvaluationSection
from dpo.config.fields import ConfigError, as_field_value, check_field, declared_default
from dpo.config.loss import LossSection, fold_rpo
from dpo.config.model import ModelSection, uses_peft
from dpo.loss import is_unpaired
from dpo.config.online import OnlineSection
from dpo.config.optimisation import OptimisationSection
from dpo.config.run import RunSection, check_best_model

# In the order their fields come in TrainConfig, `--help` and a saved training_config.yaml.
# Distributed settings (processes, mixed precision, DeepSpeed, FSDP) are accelerate's, given
# to `accelerate launch`, not fields here.
SECTIONS = (ModelSection, DataSection, LossSection, OptimisationSection, EvaluationSection,
            RunSection, OnlineSection)


# A dataclass collects its bases' fields from the last base to the first: ModelSection's come
# first, as in SECTIONS.
@dataclass
class TrainConfig(OnlineSection, RunSection, EvaluationSection, OptimisationSection, LossSection,
                  DataSection, ModelSection):
    """Every setting of a training run, from `--config file.yaml` and the flags."""

    def __post_init__(self) -> None:
        for name, tp in field_types().items():
            setattr(self, name, as_field_value(tp, getattr(self, name)))
        if isinstance(self.rpo_alpha, (int, float)) and self.rpo_alpha > 0:
            self.loss_type, self.loss_weights, self.rpo_alpha = fold_rpo(
                self.loss_type, self.loss_weights, self.rpo_alpha)
        if isinstance(self.prompt_template, str):  # a shell passes "\n" as two characters
            self.prompt_template = self.prompt_template.replace("\\n", "\n").replace("\\t", "\t")
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range; raise ConfigError with one line."""
        types = field_types()
        for f in dataclasses.fields(self):  # types first: the sections compare values
            check_field(f, getattr(self, f.name), types[f.name])
        self._validate_model()
        self._validate_data()
        self._validate_loss()
        self._validate_optimisation()
        self._validate_evaluation()
        self._validate_run()
        self._validate_online()
        self._validate_across()

    def _validate_across(self) -> None:
        """The checks that read more than one section."""
        for name in ("batch_size", "eval_batch_size"):
            size = getattr(self, name)
            if is_unpaired(self.loss_type) and size is not None and size < 2:
                raise ConfigError(f"{name} {size}: KTO estimates its KL term from each row's "
                                  "prompt with another row's completion of the micro-batch; use "
                                  f"a {name} of 2 or more")
        if self.sync_ref_model and uses_peft(self):
            raise ConfigError("sync_ref_model: with LoRA the reference is the policy with its "
                              "adapter off, not a model to update; drop one of them")
        check_best_model(self)

    def to_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def default_of(name: str):
    """A field's default value (a fresh copy for a list)."""
    return declared_default(TrainConfig, name)


def field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)
