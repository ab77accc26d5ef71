"""The command line and YAML side of the config: `load_config` reads `--config file.yaml`, lets
flags override it, and builds `TrainConfig`; `--help` lists the flags section by section."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import typing
from pathlib import Path

import yaml

from dpo.config.fields import ConfigError, _base_type, _is_optional
from dpo.config.schema import SECTIONS, TrainConfig, field_types

def load_config(argv: list[str] | None = None, **fixed) -> TrainConfig:
    """TrainConfig from `--config file.yaml` (optional) overridden by command-line flags, and
    those by `fixed` (fields a command sets whatever the file and flags say)."""
    parser = _build_parser()
    args = parser.parse_args(_spelled_booleans(parser, sys.argv[1:] if argv is None else argv))
    values = _resolve_aliases(_read_yaml(Path(args.config)), f"--config {args.config}: ") \
        if args.config else {}
    flags = {}
    for key, value in vars(args).items():
        if key != "config" and value is not None:  # None: flag absent; _NONE: given as `none`
            if isinstance(value, list):  # a list flag: `none` for all, or for one dataset
                value = _NONE if value == [_NONE] else [None if v is _NONE else v for v in value]
            flags[key] = None if value is _NONE else value
    # Counts per dataset say how many rows in all, unless num_samples is given beside them
    # (in the flags, or in the file the counts come from): then the two must agree.
    counts = flags.get("dataset_num_samples", values.get("dataset_num_samples"))
    beside = flags if "dataset_num_samples" in flags else {**values, **flags}
    if isinstance(counts, list) and "num_samples" not in beside and all(
            isinstance(c, int) and not isinstance(c, bool) for c in counts):
        values["num_samples"] = sum(counts)
    values.update(_resolve_aliases(flags, ""))
    return TrainConfig(**{**values, **fixed})


BOOLEAN_WORDS = {"true": True, "false": False}


def _spelled_booleans(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--flag true` / `--flag false` as `--flag` / `--no-flag`: a boolean spelled the way
    transformers' TrainingArguments, and scripts written for it, spell one."""
    flags = {option for action in parser._actions
             if isinstance(action, argparse.BooleanOptionalAction)
             for option in action.option_strings if not option.startswith("--no-")}
    out, i = [], 0
    while i < len(argv):
        name, eq, word = argv[i].partition("=")
        i += 1
        if name not in flags:
            out.append(argv[i - 1])
            continue
        if not eq and i < len(argv) and argv[i].lower() in BOOLEAN_WORDS:
            word, eq, i = argv[i], "=", i + 1
        if eq and word.lower() not in BOOLEAN_WORDS:
            parser.error(f"{name}: expected true or false, got {word!r}")
        out.append(name if not eq or BOOLEAN_WORDS[word.lower()] else "--no-" + name[2:])
    return out


# Older names kept working: alias -> (field, {alias value: field value}).
ALIASES = {"use_chat_template": ("chat_template", {True: "auto", False: "plain"})}


def _resolve_aliases(values: dict, where: str) -> dict:
    """Replace alias keys by their fields, within one source (the YAML file, or the flags), so
    that flags still override the file; an alias that contradicts its field there is an error."""
    for alias, (name, meaning) in ALIASES.items():
        if alias not in values:
            continue
        value = values.pop(alias)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{alias} must be true or false, got {value!r}")
        if name in values and values[name] != meaning[value]:
            raise ConfigError(f"{where}{alias} {str(value).lower()} means {name} "
                              f"{meaning[value]}, but {name} is {values[name]}; give one of them")
        values[name] = meaning[value]
    return values


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=Path(sys.argv[0]).name,
        description="Direct Preference Optimization of a causal LM. Flags override --config.",
        epilog="Processes, mixed precision, DeepSpeed and FSDP are set by `accelerate launch` "
               "(--config_file configs/accelerate/*.yaml), not by these flags.",
    )
    parser.add_argument("--config", help="YAML file with any of the fields below (snake_case)")
    types = field_types()
    for section in SECTIONS:
        title, _, description = section.__doc__.partition(": ")
        group = parser.add_argument_group(title, description)
        for f in dataclasses.fields(section):
            _add_flag(group, f, types[f.name])
    aliases = parser.add_argument_group("aliases", "older names that still work")
    for alias, (name, meaning) in ALIASES.items():
        aliases.add_argument("--" + alias.replace("_", "-"), action=argparse.BooleanOptionalAction,
                             help=f"alias: --{name.replace('_', '-')} {meaning[True]} / "
                                  f"{meaning[False]}")
    return parser


def _add_flag(group, f: dataclasses.Field, tp) -> None:
    flag = "--" + f.name.replace("_", "-")
    default = f.metadata["default"]
    if isinstance(default, list):
        default = " ".join(map(str, default))
    help_text = f"{f.metadata['help']} (default: {default})"
    base = _base_type(tp)
    if base is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
    elif typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        group.add_argument(flag, nargs="+", help=help_text,
                           type=_cli_parser(f.name, _base_type(item),
                                            _is_optional(item) or _is_optional(tp)),
                           metavar=_base_type(item).__name__.upper())
    else:
        group.add_argument(flag, type=_cli_parser(f.name, base, _is_optional(tp)),
                           metavar="JSON" if base is dict else base.__name__.upper(),
                           help=help_text)

def _cli_parser(name: str, base: type, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return _NONE
        try:
            return json.loads(text) if base is dict else base(text)
        except ValueError:
            if base is dict:
                raise argparse.ArgumentTypeError(
                    f"expected a JSON mapping such as '{{\"enable_thinking\": false}}', got "
                    f"{text!r}") from None
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
    parse.__name__ = base.__name__  # argparse names the type in its error message
    return parse


class _NoneSentinel:
    """A flag given as `none`: distinct from an absent flag (argparse's None)."""


_NONE = _NoneSentinel()


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field: value")
    fields = field_types()
    for key in values:
        if key not in fields and key not in ALIASES:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
    return values
