"""`TrainConfig`: the one schema for a training run, in sections (model, data, loss,
optimisation, evaluation, run and output), each with its own validation.

YAML files (`--config`) and command-line flags are both checked against this dataclass: a YAML key
is a field name, a flag is the field name in kebab case (`gradient_accumulation_steps` ↔
`--gradient-accumulation-steps`), flags override the file. Every problem is a `ConfigError` with
one line naming the field, raised before any model or dataset is loaded.

- `fields.py`: `ConfigError`, how a field is declared, the type rules;
- `model.py`, `data.py`, `loss.py`, `optimisation.py`, `evaluation.py` (with `judge.py`),
  `run.py`: one section each, its fields and its `_validate_<section>`;
- `schema.py`: `TrainConfig`, the sections' fields side by side, and the checks across them;
- `cli.py`: `load_config`, the YAML file and the flags.
"""
from dpo.config.cli import _build_parser, load_config  # noqa: F401 (the parser: for tests)
from dpo.config.fields import ConfigError, as_field_value
from dpo.config.loss import fold_rpo
from dpo.config.schema import SECTIONS, TrainConfig, default_of, field_types

__all__ = ["SECTIONS", "ConfigError", "TrainConfig", "as_field_value", "default_of", "field_types",
           "fold_rpo", "load_config"]
