"""What every section of the config is made of: a field with its help and default, the error a
bad setting raises, and the type rules that YAML values and flags are checked against."""
from __future__ import annotations

import dataclasses
import types
import typing


class ConfigError(ValueError):
    """A bad setting: the message is one line that names the field and what to do."""


def _opt(default, help: str, **metadata):
    """A config field: its default, its `--help` text and (optionally) its `choices`."""
    metadata = {"help": help, "default": default, **metadata}
    if isinstance(default, list):  # a dataclass default must not be shared between instances
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared_default(section, name: str):
    """The default that `section` (a config dataclass or instance) declares for field `name`,
    a fresh copy for a list."""
    default = section.__dataclass_fields__[name].metadata["default"]
    return list(default) if isinstance(default, list) else default


def _is_optional(tp) -> bool:
    return isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)


def _base_type(tp) -> type:
    return next(a for a in typing.get_args(tp) if a is not type(None)) if _is_optional(tp) else tp


def as_field_value(tp, value):
    """``value`` as the field of type ``tp`` holds it: a single value given for a list field
    (YAML's `dataset: x`, a checkpoint saved before the field was a list) becomes a one-item
    list, and an int given for a float (YAML's `beta: 1`) a float."""
    base = _base_type(tp)
    if typing.get_origin(base) is list:
        if value is None or isinstance(value, (list, tuple)):
            item = typing.get_args(base)[0]
            return value if value is None else [as_field_value(item, v) for v in value]
        return [value]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_type(name: str, value, tp) -> None:
    if value is None:
        if _is_optional(tp):
            return
        raise ConfigError(f"{name} must be set (it cannot be null)")
    base = _base_type(tp)
    if typing.get_origin(base) is list:
        if not value:
            raise ConfigError(f"{name}: the list is empty; give at least one value")
        for item in value:
            _check_type(name, item, typing.get_args(base)[0])
        return
    ok = (isinstance(value, bool) if base is bool
          else isinstance(value, (int, float)) and not isinstance(value, bool) if base is float
          else isinstance(value, base) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{name} must be a {'mapping' if base is dict else base.__name__}, "
                          f"got {value!r}")


def check_field(f: dataclasses.Field, value, tp) -> None:
    """ConfigError unless `value` has field `f`'s type `tp` and is (each item) one of its
    choices."""
    _check_type(f.name, value, tp)
    choices = f.metadata.get("choices")
    for item in value if isinstance(value, list) else [value]:
        if choices and item not in choices:
            raise ConfigError(f"{f.name}: {item!r} is not one of {', '.join(choices)}")


def check_at_least(section, minimum: int, *names: str) -> None:
    """ConfigError for the first of the fields `names` of `section` that is set and below
    `minimum`."""
    for name in names:
        value = getattr(section, name)
        if value is not None and not value >= minimum:  # NaN is below every bound
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")
