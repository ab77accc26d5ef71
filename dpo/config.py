"""`TrainConfig`: the one schema for a training run.

YAML files (`--config`) and command-line flags are both checked against this dataclass: a YAML key
is a field name, a flag is the field name in kebab case (`gradient_accumulation_steps` ↔
`--gradient-accumulation-steps`), flags override the file. Every problem is a `ConfigError` with
one line naming the field, raised before any model or dataset is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import SchedulerType

from dpo.loss import LOSS_TYPES, check_loss_options


class ConfigError(ValueError):
    """A bad setting: the message is one line that names the field and what to do."""


def _opt(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    # Model
    model: str = _opt("Qwen/Qwen3-0.6B", "hub name or local directory of a causal LM")
    dtype: str = _opt("float32", "weights' dtype; mixed precision comes from accelerate "
                      "(--mixed_precision bf16) and keeps fp32 master weights",
                      choices=("float32", "bfloat16", "float16"))
    attn_implementation: str | None = _opt(None, "e.g. sdpa, eager, flash_attention_2")
    trust_remote_code: bool = _opt(False, "run modelling code shipped with the model (trust it!)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass")
    ref_model: str | None = _opt(None, "reference model other than --model (hub name, local "
                                 "directory or PEFT adapter folder); same tokenizer required")
    # LoRA through peft (pip install -e ".[peft]"); the reference is the policy, adapter off
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
    # Data
    dataset: str = _opt("lvwerra/stack-exchange-paired", "hub name, or a local file or folder")
    data_format: str | None = _opt(None, "override the format detected from the columns")
    num_samples: int | None = _opt(1000, "rows drawn (seeded) from the train split; null = all")
    eval_samples: int | None = _opt(None, "rows held out for eval when there is no test split "
                                    "(default 10%% of num_samples, 1..200)")
    # Which rows: subsets, splits, streaming (dpo.data.sources.load_preference_splits)
    dataset_config: str | None = _opt(None, "hub config (subset) name, as load_dataset(name=...)")
    data_dir: str | None = _opt(None, "subfolder of the dataset to read, as load_dataset(data_dir="
                                "...), e.g. data/rl")
    split: str = _opt("train", "split to draw from; a slice such as train[:5%%] works when not "
                      "streaming")
    eval_dataset: str | None = _opt(None, "dataset for eval rows (default: --dataset)")
    eval_dataset_config: str | None = _opt(None, "its config (default: --dataset-config when "
                                           "eval_dataset is the same)")
    eval_data_dir: str | None = _opt(None, "its subfolder (default: --data-dir when eval_dataset "
                                     "is the same)")
    eval_split: str | None = _opt(None, "eval split (default: a test/validation split if any, "
                                  "else rows held out of the draw)")
    streaming: bool | None = _opt(None, "stream the data and read only the rows drawn (default: "
                                  "on for a hub dataset when num_samples is set)")
    shuffle_buffer_size: int = _opt(10_000, "rows in the streamed shuffle's buffer: a draw reads "
                                    "about num_samples + this many rows, over shuffled shards")
    max_length: int = _opt(512, "tokens per prompt+response sequence")
    max_prompt_length: int | None = _opt(None, "prompt tokens kept (its end); max_length // 2")
    chat_template: str = _opt("auto", "how a pair becomes text: auto = the tokenizer's chat "
                              "template (plain without one); plain = '\\n\\nHuman: ..."
                              "\\n\\nAssistant: ...'; none = prompt and response strings as "
                              "they are, EOS appended (base models). --use-chat-template / "
                              "--no-use-chat-template mean auto / plain",
                              choices=("auto", "none", "plain"))
    prompt_template: str | None = _opt(None, "with chat_template none: the prompt's text, {prompt} "
                                       "standing for the prompt field, e.g. 'Question: {prompt}"
                                       "\\n\\nAnswer: ' (a \\n or \\t written as two "
                                       "characters, as a shell passes it, means newline or tab)")
    strict_data: bool = _opt(False, "fail on the first invalid row instead of skipping it")
    group_by_length: bool = _opt(True, "batch pairs of similar length to cut padding")
    num_proc: int | None = _opt(None, "processes for tokenisation (datasets.map)")
    tokenize_cache: bool = _opt(True, "keep the tokenized pairs under $DPO_CACHE_DIR/tokenized "
                                "and load them when the rows, tokenizer and settings recur")
    # Objective
    beta: float = _opt(0.1, "β: strength of the implicit KL penalty to the reference")
    loss_type: str = _opt("sigmoid", "DPO loss variant", choices=LOSS_TYPES)
    label_smoothing: float = _opt(0.0, "ε for cDPO (sigmoid) and robust DPO")
    simpo_gamma: float = _opt(0.0, "γ, the target margin of SimPO")
    rpo_alpha: float = _opt(0.0, "weight of the NLL-on-chosen term (RPO); 0 = off")
    precompute_ref_logps: bool = _opt(False, "compute the reference's log-probs in one pass "
                                      "before training (cached on disk), then free the reference")
    # Optimisation
    epochs: int = _opt(1, "passes over the training data (--max-steps overrides)")
    max_steps: int | None = _opt(None, "optimizer steps to run, across epochs if needed")
    batch_size: int = _opt(2, "pairs per device per micro-batch")
    eval_batch_size: int | None = _opt(None, "pairs per device for eval; default batch_size")
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
    seed: int = _opt(42, "seed for data order, sampling and initialisation")
    # Logging, eval, checkpoints
    logging_steps: int = _opt(10, "log metrics every N optimizer steps")
    eval_steps: int | None = _opt(None, "evaluate every N optimizer steps (and always at the end)")
    eval_on_start: bool = _opt(False, "also evaluate before the first step (the 'before' numbers)")
    num_sample_generations: int = _opt(2, "eval prompts answered by policy and reference")
    max_new_tokens: int = _opt(64, "length of those sample generations")
    save_steps: int | None = _opt(None, "save a resumable checkpoint every N optimizer steps")
    save_total_limit: int | None = _opt(None, "keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = _opt(None, "a checkpoint directory, or 'latest'")
    report_to: str = _opt("none", "tracker", choices=("none", "tensorboard", "wandb"))
    output_dir: str = _opt("outputs/dpo_qwen_trl", "where checkpoints, metrics and the model go")
    overwrite_output_dir: bool = _opt(False, "delete a non-empty output_dir first")

    def __post_init__(self) -> None:
        for name, tp in _field_types().items():  # YAML's `beta: 1` is an int; the field a float
            value = getattr(self, name)
            if _base_type(tp) is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))
        if isinstance(self.prompt_template, str):  # a shell passes "\n" as two characters
            self.prompt_template = self.prompt_template.replace("\\n", "\n").replace("\\t", "\t")
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range; raise ConfigError with one line."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, _field_types()[f.name])
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(choices)}")
        positive = ("batch_size", "gradient_accumulation_steps", "epochs", "logging_steps",
                    "max_length", "logps_chunk_size", "max_new_tokens", "num_samples",
                    "eval_batch_size", "max_steps", "eval_steps", "save_steps",
                    "save_total_limit", "num_proc", "max_prompt_length")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name in ("eval_samples", "num_sample_generations"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm", "rpo_alpha"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be below "
                              f"max_length ({self.max_length}) to leave room for the response")
        if self.rpo_alpha and self.loss_type == "simpo":
            raise ConfigError("rpo_alpha: the RPO term is defined for reference-based losses, "
                              "not loss_type simpo")
        if self.precompute_ref_logps and self.loss_type == "simpo":
            raise ConfigError("precompute_ref_logps: loss_type simpo is reference-free, there is "
                              "nothing to precompute; drop the flag")
        try:
            check_loss_options(beta=self.beta, loss_type=self.loss_type,
                               label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.data_format is not None:
            from dpo.data import DATA_FORMATS

            if self.data_format not in DATA_FORMATS:
                raise ConfigError(f"data_format: {self.data_format!r} is not one of "
                                  f"{', '.join(DATA_FORMATS)}")
        from dpo.data.sources import check_streaming
        from dpo.data.tokenize import check_text_settings

        if self.shuffle_buffer_size < 1:
            raise ConfigError(f"shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}")
        try:  # the checks the data code makes again, here before anything loads
            check_text_settings(self.chat_template, self.prompt_template)
            check_streaming(self.streaming, self.num_samples, self.split, self.eval_split)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from dpo.lora import check_lora_settings

        check_lora_settings(self)
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ConfigError(f"report_to: {self.report_to} is not installed; "
                              f"pip install {self.report_to}, or use --report-to none")

    def to_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from `--config file.yaml` (optional) overridden by command-line flags."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    values = _resolve_aliases(_read_yaml(Path(args.config)), f"--config {args.config}: ") \
        if args.config else {}
    flags = {}
    for key, value in vars(args).items():
        if key != "config" and value is not None:  # None: flag absent; _NONE: given as `none`
            flags[key] = None if value is _NONE or value == [_NONE] else value
    values.update(_resolve_aliases(flags, ""))
    return TrainConfig(**values)


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
    )
    parser.add_argument("--config", help="YAML file with any of the fields below (snake_case)")
    defaults = TrainConfig.__dataclass_fields__
    for name, tp in _field_types().items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{defaults[name].metadata['help']} (default: {defaults[name].default})"
        base = _base_type(tp)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif _list_item(tp) is not None:  # `--flag a b c`; `--flag none` for null
            item = _list_item(tp)
            parser.add_argument(flag, nargs="+", type=_cli_parser(name, item, _is_optional(tp)),
                                metavar=item.__name__.upper(), help=help_text)
        else:
            parser.add_argument(flag, type=_cli_parser(name, base, _is_optional(tp)),
                                metavar=base.__name__.upper(), help=help_text)
    for alias, (name, meaning) in ALIASES.items():
        parser.add_argument("--" + alias.replace("_", "-"), action=argparse.BooleanOptionalAction,
                            help=f"alias: --{name.replace('_', '-')} {meaning[True]} / "
                                 f"{meaning[False]}")
    return parser


def _cli_parser(name: str, base: type, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return _NONE
        try:
            return base(text)
        except ValueError:
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
    fields = _field_types()
    for key in values:
        if key not in fields and key not in ALIASES:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
    return values


def _field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def _is_optional(tp) -> bool:
    return isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)


def _base_type(tp) -> type:
    return next(a for a in typing.get_args(tp) if a is not type(None)) if _is_optional(tp) else tp


def _list_item(tp) -> type | None:
    """The item type of a `list[X]` (or `list[X] | None`) field, else None."""
    base = _base_type(tp)
    return typing.get_args(base)[0] if typing.get_origin(base) is list else None


def _check_type(name: str, value, tp) -> None:
    if value is None:
        if _is_optional(tp):
            return
        raise ConfigError(f"{name} must be set (it cannot be null)")
    item = _list_item(tp)
    if item is not None:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{name} must be a non-empty list of {item.__name__}, got "
                              f"{value!r}")
        for element in value:
            _check_type(name, element, item)
        return
    base = _base_type(tp)
    ok = (isinstance(value, bool) if base is bool
          else isinstance(value, (int, float)) and not isinstance(value, bool) if base is float
          else isinstance(value, base) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{name} must be a {base.__name__}, got {value!r}")
