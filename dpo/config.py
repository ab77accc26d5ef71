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

from dpo.loss import LOSS_TYPES, check_loss_options, needs_reference


class ConfigError(ValueError):
    """A bad setting: the message is one line that names the field and what to do."""


def _opt(default, help: str, **metadata):
    metadata = {"help": help, "default": default, **metadata}
    if isinstance(default, list):  # a dataclass default must not be shared between instances
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(name: str):
    """A field's default value (a fresh copy for a list)."""
    default = TrainConfig.__dataclass_fields__[name].metadata["default"]
    return list(default) if isinstance(default, list) else default


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
    router_aux_loss_coef: float | None = _opt(None, "weight of a mixture-of-experts model's "
                                              "router load-balancing loss, added to the loss "
                                              "(default: the model config's; 0 = off)")
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
    dataset: list[str] = _opt(["lvwerra/stack-exchange-paired"], "hub name, or a local file or "
                              "folder; several make a mixture (see dataset_weights)")
    data_format: list[str | None] | None = _opt(None, "override the format detected from the "
                                                "columns (one for all datasets, or one each)")
    num_samples: int | None = _opt(1000, "rows drawn (seeded) from the train split(s); null = all")
    eval_samples: int | None = _opt(None, "eval rows (a mixture's total, split like num_samples); "
                                    "default 10%% of num_samples, 1..200 per dataset")
    # Mixtures (dpo.data.mixture): how num_samples is shared out among the datasets
    dataset_weights: list[float] | None = _opt(None, "each dataset's share of num_samples (and "
                                               "of eval_samples), normalised; default equal")
    dataset_num_samples: list[int] | None = _opt(None, "rows drawn from each dataset, instead of "
                                                 "weights; num_samples is then their sum")
    # Which rows: subsets, splits, streaming (dpo.data.sources.load_preference_splits)
    dataset_config: list[str | None] | None = _opt(None, "hub config (subset) name, as "
                                                   "load_dataset(name=...); one for all or each")
    data_dir: list[str | None] | None = _opt(None, "subfolder of the dataset to read, as "
                                             "load_dataset(data_dir=...), e.g. data/rl; one for "
                                             "all or one each (none: the whole dataset)")
    split: list[str] = _opt(["train"], "split to draw from (one for all or one each); a slice "
                            "such as train[:5%%] works when not streaming")
    eval_dataset: str | None = _opt(None, "dataset for eval rows (default: --dataset; not with "
                                    "a mixture, whose datasets each give their own)")
    eval_dataset_config: str | None = _opt(None, "its config (default: --dataset-config when "
                                           "eval_dataset is the same)")
    eval_data_dir: str | None = _opt(None, "its subfolder (default: --data-dir when eval_dataset "
                                     "is the same)")
    eval_split: str | None = _opt(None, "eval split, of every dataset (default: a "
                                  "test/validation split if any, else rows held out of the draw); "
                                  "a slice of --split's split (train[80%%:]) is read whole and "
                                  "must not overlap --split")
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
    padding_free: bool | None = _opt(None, "pack each micro-batch's sequences end to end in "
                                     "rows (position ids restarting at each), no padding; "
                                     "checked against separate sequences at start-up. Default: "
                                     "on for sdpa models that pass the check, else off (said "
                                     "in one line)")
    padding_free_max_tokens: int = _opt(4096, "longest packed row; sequences beyond it go to "
                                        "more rows (attention builds an L x L mask per row)")
    num_proc: int | None = _opt(None, "processes for tokenisation (datasets.map)")
    tokenize_cache: bool = _opt(True, "keep the tokenized pairs under $DPO_CACHE_DIR/tokenized "
                                "and load them when the rows, tokenizer and settings recur")
    # Objective
    beta: float = _opt(0.1, "β: strength of the implicit KL penalty to the reference")
    loss_type: list[str] = _opt(["sigmoid"], "preference loss (see dpo/loss and docs/dpo.md); "
                                "several make a mixture (MPO), summed with loss_weights",
                                choices=LOSS_TYPES)
    loss_weights: list[float] | None = _opt(None, "weight of each loss_type (default 1 each)")
    label_smoothing: float | None = _opt(None, "ε of the losses that take it: sigmoid (cDPO), "
                                         "robust, exo_pair, aot, aot_unpaired (default 0; "
                                         "exo_pair 1e-3)")
    simpo_gamma: float = _opt(0.0, "γ, the target margin of SimPO")
    discopop_tau: float = _opt(0.05, "τ, the temperature of DiscoPOP's modulation")
    f_divergence_type: str = _opt("reverse_kl", "divergence from the reference whose score "
                                  "difference sigmoid, robust, exo_pair, discopop and hinge push "
                                  "(f-DPO; an sft term may stand beside them); reverse_kl is "
                                  "DPO's",
                                  choices=("reverse_kl", "forward_kl", "js_divergence",
                                           "alpha_divergence"))
    f_alpha_divergence_coef: float = _opt(0.5, "α of alpha_divergence, in the f-DPO paper's "
                                          "form f'(u) = (1 - u^(-α))/α (1 = forward_kl); TRL "
                                          "1.16's f_alpha_divergence_coef is 1 - α")
    bco_baseline: str = _opt("running_mean", "δ of bco_pair: the running mean of the rewards, or "
                             "none (δ = 0)", choices=("running_mean", "none"))
    use_weighting: bool = _opt(False, "WPO: weight each pair's loss by how likely the policy "
                               "finds its two responses (detached, clamped at 1 as in the WPO "
                               "authors' code; TRL 1.16 does not clamp)")
    ld_alpha: float | None = _opt(None, "LD-DPO's α in [0, 1]: the longer response's tokens past "
                                  "the shorter one's length count α times in its log-prob, "
                                  "for policy and reference (1 = DPO); none = off")
    rpo_alpha: float = _opt(0.0, "RPO: adds sft to loss_type with this weight (an alias of "
                            "--loss-type ... sft --loss-weights ... α); 0 = off")
    sync_ref_model: bool = _opt(False, "TR-DPO: move the reference towards the policy every "
                                "ref_model_sync_steps optimizer steps")
    ref_model_mixup_alpha: float = _opt(0.6, "TR-DPO's α: θ_ref ← α·θ + (1 − α)·θ_ref (1 = a "
                                        "hard copy)")
    ref_model_sync_steps: int = _opt(512, "TR-DPO: optimizer steps between reference updates")
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
    # Scored generations (dpo.judges): the sample answers of policy and reference, judged
    generation_temperature: float = _opt(0.0, "sampling temperature of the sample generations; "
                                         "0 = greedy")
    generation_top_p: float = _opt(1.0, "nucleus sampling's top-p of the sample generations "
                                   "(with a temperature > 0)")
    judge: str | None = _opt(None, "scores the sample answers (eval/reward/*, eval/win_rate): "
                             "a reward model's directory or hub name (any "
                             "AutoModelForSequenceClassification, its own tokenizer and chat "
                             "template), or builtin:demo-rule (the demo's polite+on-topic rule)")
    generation_batch_size: int = _opt(8, "prompts per sample-generation batch, and answers "
                                      "per judge forward")
    save_steps: int | None = _opt(None, "save a resumable checkpoint every N optimizer steps")
    save_total_limit: int | None = _opt(None, "keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = _opt(None, "a checkpoint directory, or 'latest'")
    report_to: str = _opt("none", "tracker", choices=("none", "tensorboard", "wandb"))
    output_dir: str = _opt("outputs/dpo_qwen_trl", "where checkpoints, metrics and the model go")
    overwrite_output_dir: bool = _opt(False, "delete a non-empty output_dir first")

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
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, field_types()[f.name])
            choices = f.metadata.get("choices")
            for item in value if isinstance(value, list) else [value]:
                if choices and item not in choices:
                    raise ConfigError(f"{f.name}: {item!r} is not one of {', '.join(choices)}")
        positive = ("batch_size", "gradient_accumulation_steps", "epochs", "logging_steps",
                    "max_length", "logps_chunk_size", "max_new_tokens", "num_samples",
                    "eval_batch_size", "max_steps", "eval_steps", "save_steps",
                    "save_total_limit", "num_proc", "max_prompt_length",
                    "padding_free_max_tokens", "generation_batch_size")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name in ("eval_samples", "num_sample_generations"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm", "rpo_alpha", "router_aux_loss_coef"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.generation_temperature >= 0:
            raise ConfigError("generation_temperature must be >= 0 (0 = greedy), got "
                              f"{self.generation_temperature}")
        if not 0 < self.generation_top_p <= 1:
            raise ConfigError(f"generation_top_p must lie in (0, 1], got {self.generation_top_p}")
        if self.generation_top_p < 1 and self.generation_temperature == 0:
            raise ConfigError("generation_top_p samples, but generation_temperature is 0 "
                              "(greedy): set a temperature > 0, or drop top-p")
        from dpo.eval.judges import check_judge

        check_judge(self)
        if self.judge is not None and self.num_sample_generations == 0:
            raise ConfigError("judge scores the sample generations, but num_sample_generations "
                              "is 0: set it to the number of eval prompts to judge")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be below "
                              f"max_length ({self.max_length}) to leave room for the response")
        if self.padding_free is True and self.padding_free_max_tokens < self.max_length:
            raise ConfigError(f"padding_free_max_tokens ({self.padding_free_max_tokens}) must be "
                              f">= max_length ({self.max_length}): every sequence must fit a row")
        types = ", ".join(self.loss_type)
        if self.precompute_ref_logps and not needs_reference(self.loss_type):
            raise ConfigError(f"precompute_ref_logps: loss_type {types} is reference-free, there "
                              "is nothing to precompute; drop the flag")
        if self.bco_baseline != "running_mean" and "bco_pair" not in self.loss_type:
            raise ConfigError(f"bco_baseline is the baseline of loss_type bco_pair, not of "
                              f"{types}; drop it")
        try:
            check_loss_options(beta=self.beta, loss_type=self.loss_type,
                               loss_weights=self.loss_weights,
                               label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
                               discopop_tau=self.discopop_tau,
                               f_divergence_type=self.f_divergence_type,
                               f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                               use_weighting=self.use_weighting, ld_alpha=self.ld_alpha)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.discopop_tau != default_of("discopop_tau") and "discopop" not in self.loss_type:
            raise ConfigError(f"discopop_tau is the temperature of loss_type discopop, not of "
                              f"{types}; drop it")
        self._check_reference_sync(types)
        if (self.f_alpha_divergence_coef != default_of("f_alpha_divergence_coef")
                and self.f_divergence_type != "alpha_divergence"):
            raise ConfigError("f_alpha_divergence_coef is the α of f_divergence_type "
                              f"alpha_divergence, not of {self.f_divergence_type}; drop it")
        from dpo.data import DATA_FORMATS
        from dpo.data.mixture import PER_DATASET, check_mixture
        from dpo.data.sources import check_streaming
        from dpo.data.tokenize import check_text_settings

        for data_format in self.data_format or []:
            if data_format is not None and data_format not in DATA_FORMATS:
                raise ConfigError(f"data_format: {data_format!r} is not one of "
                                  f"{', '.join(DATA_FORMATS)}")
        if self.shuffle_buffer_size < 1:
            raise ConfigError(f"shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}")
        try:  # the checks the data code makes again, here before anything loads
            check_text_settings(self.chat_template, self.prompt_template)
            for split in self.split:
                check_streaming(self.streaming, self.num_samples, split, self.eval_split)
            check_mixture(self.dataset, weights=self.dataset_weights,
                          counts=self.dataset_num_samples, num_samples=self.num_samples,
                          per_dataset={name: getattr(self, name) for name in PER_DATASET},
                          eval_dataset=self.eval_dataset)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from dpo.model.lora import check_lora_settings

        check_lora_settings(self)
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ConfigError(f"report_to: {self.report_to} is not installed; "
                              f"pip install {self.report_to}, or use --report-to none")

    def _check_reference_sync(self, types: str) -> None:
        if not self.sync_ref_model:
            for name in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
                if getattr(self, name) != default_of(name):
                    raise ConfigError(f"{name} sets TR-DPO's reference updates: add "
                                      "--sync-ref-model, or drop it")
            return
        if not needs_reference(self.loss_type):
            raise ConfigError(f"sync_ref_model: loss_type {types} uses no reference to update")
        from dpo.model.lora import uses_peft

        if uses_peft(self):
            raise ConfigError("sync_ref_model: with LoRA the reference is the policy with its "
                              "adapter off, not a model to update; drop one of them")
        if self.precompute_ref_logps:
            raise ConfigError("sync_ref_model: precomputed reference log-probs would go stale "
                              "at the first update; drop --precompute-ref-logps")
        if not 0 < self.ref_model_mixup_alpha <= 1:
            raise ConfigError("ref_model_mixup_alpha must lie in (0, 1], got "
                              f"{self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise ConfigError(f"ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")

    def per_dataset(self, name: str) -> list:
        """A per-dataset field's value for each dataset: one value given stands for all."""
        value = getattr(self, name)
        values = [None] if value is None else value
        return values * len(self.dataset) if len(values) == 1 else list(values)

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
    for name, tp in field_types().items():
        flag = "--" + name.replace("_", "-")
        default = defaults[name].metadata["default"]
        if isinstance(default, list):
            default = " ".join(map(str, default))
        help_text = f"{defaults[name].metadata['help']} (default: {default})"
        base = _base_type(tp)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            parser.add_argument(flag, nargs="+", help=help_text,
                                type=_cli_parser(name, _base_type(item),
                                                 _is_optional(item) or _is_optional(tp)),
                                metavar=_base_type(item).__name__.upper())
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
    fields = field_types()
    for key in values:
        if key not in fields and key not in ALIASES:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
    return values


def field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def _is_optional(tp) -> bool:
    return isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)


def _base_type(tp) -> type:
    return next(a for a in typing.get_args(tp) if a is not type(None)) if _is_optional(tp) else tp


def fold_rpo(loss_type: list[str], loss_weights: list[float] | None, rpo_alpha: float
             ) -> tuple[list[str], list[float] | None, float]:
    """`rpo_alpha` α as what it means: RPO is the mixture of the loss types with `sft` at weight
    α. Returns the mixture's types and weights, and the alias spent (0)."""
    if "sft" in loss_type:
        raise ConfigError("rpo_alpha adds sft to loss_type, which has it already; give its "
                          "weight in loss_weights instead")
    weights = loss_weights if loss_weights is not None else [1.0] * len(loss_type)
    return [*loss_type, "sft"], [*weights, float(rpo_alpha)], 0.0


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
        raise ConfigError(f"{name} must be a {base.__name__}, got {value!r}")
