"""From `--dataset` to data loaders, with every bad input reported as one line before training.

`dpo.data` does the work (load, normalise, tokenize, validate, batch); this module wires it to a
run's config and process layout, and turns whatever a broken file raises deep inside `datasets`
or pyarrow into a `ConfigError` that names the file and what to do.
"""
from __future__ import annotations

import codecs
import contextlib
import gzip
import logging
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from datasets.exceptions import DatasetGenerationError
from torch.utils.data import DataLoader

from dpo import data, demo
from dpo.config import ConfigError, TrainConfig
from dpo.data.cache import default_cache_dir, tokenize_cached
from dpo.data.formats import holds_prompts_only
from dpo.data import images, mixture, ranked, unpaired
from dpo.data.mixture import PER_DATASET
from dpo.data.sources import layout_warning
from dpo.data.messages import read_tools_file
from dpo.data.report import NoPairsLeft
from dpo.loss import is_unpaired
from dpo.model.vision import check_vision_data

TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".gz")


def build_datasets(cfg: TrainConfig, accelerator: Accelerator, tokenizer, processor=None):
    """`(train pairs, eval pairs or None)`: loaded, tokenized (with images: by `processor`,
    a vision model's, None for a text model) and validated.

    A mixture (several `--dataset`s, see `dpo.data.mixture`) is drawn and tokenized dataset by
    dataset, each with its own filter report, then concatenated; its eval rows carry their
    dataset's index in `source` (the order of `dataset_names(cfg)`).
    """
    datasets_ = [demo.resolve_dataset(d) for d in cfg.dataset]
    eval_dataset = cfg.eval_dataset and demo.resolve_dataset(cfg.eval_dataset)
    for dataset in (*datasets_, *([eval_dataset] if eval_dataset else [])):
        check_local_files(dataset)
    for dataset, data_dir in zip(datasets_, cfg.per_dataset("data_dir")):
        warning = layout_warning(dataset, data_dir)
        if warning:
            accelerator.print(warning)
    names = dataset_names(cfg)
    shares = mixture.plan(cfg.num_samples, cfg.eval_samples,
                          cfg.dataset_weights or cfg.dataset_num_samples, len(datasets_))
    settings = [dict(zip(PER_DATASET, values))
                for values in zip(*map(cfg.per_dataset, PER_DATASET))]
    train_parts, eval_parts, emptied = [], [], []
    # Under main_process_first the main process tokenizes and saves; the others load its result.
    with accelerator.main_process_first(), _quiet_datasets_logger():
        for i, name in enumerate(names):
            num_samples, eval_samples = shares[i]
            train, evals, report = _load_one(
                cfg, accelerator, tokenizer, datasets_[i], cfg.dataset[i], seed=cfg.seed + i,
                num_samples=num_samples, eval_samples=eval_samples, eval_dataset=eval_dataset,
                mixed=len(names) > 1, processor=processor, **settings[i])
            accelerator.print(f"train pairs{f' ({name})' if len(names) > 1 else ''}: {report}")
            train_parts.append(train)
            if isinstance(evals, EmptyEval):
                accelerator.print(f"warning: eval pairs ({name}): {evals}; {name} is left out "
                                  "of eval, the other datasets are evaluated")
                emptied.append(f"{name}: {evals}")
            elif evals is not None:
                eval_parts.append(evals.add_column("source", [i] * len(evals))
                                  if len(names) > 1 else evals)
    if emptied and not eval_parts:
        raise ConfigError(f"no eval pair is left of any dataset ({'; '.join(emptied)}); choose "
                          "other eval rows, or --eval-samples 0 to train without eval")
    check_vision_data(accelerator, cfg, train_parts, eval_parts)
    if len(train_parts) > 1:
        accelerator.print(f"train pairs: {sum(map(len, train_parts))} from {len(names)} datasets "
                          f"({', '.join(f'{n} {len(p)}' for n, p in zip(names, train_parts))})")
    # A mixture of rankings and pairs trains as rankings: each pair a ranking of two.
    train_parts, eval_parts = ranked.as_rankings(train_parts), ranked.as_rankings(eval_parts)
    train_ds = datasets.concatenate_datasets(train_parts) if len(train_parts) > 1 \
        else train_parts[0]
    if is_unpaired(cfg.loss_type):
        try:
            unpaired.check_both_classes(train_ds)
        except ValueError as e:
            raise ConfigError(f"dataset {', '.join(cfg.dataset)}: {e}") from None
    eval_ds = datasets.concatenate_datasets(eval_parts) if eval_parts else None
    return train_ds, eval_ds


def make_collator(cfg: TrainConfig, tokenizer, processor=None) -> data.PreferenceCollator:
    """The run's collator, padding or packing, sharing prompts or not, as `cfg.padding_free` and
    `cfg.share_prompt` settled (bools by then: `dpo.model.probes.settle_logps_path` decides the
    defaults once the model is loaded); with a vision model's `processor`, pixels too."""
    if cfg.padding_free is None or cfg.share_prompt is None:
        raise ValueError("padding_free and share_prompt are not settled yet: call "
                         "settle_logps_path first")
    vision = {"processor": processor} if processor is not None else {}
    return (data.VisionCollator if vision else data.PreferenceCollator)(
        tokenizer.pad_token_id, padding_free=cfg.padding_free, share_prompt=cfg.share_prompt,
        max_packed_tokens=cfg.padding_free_max_tokens, max_length=cfg.max_length, **vision)


def dataset_names(cfg: TrainConfig) -> list[str]:
    """The name of each dataset of the run, as its eval metrics are logged (`eval/<name>/...`)."""
    return mixture.dataset_names(cfg.dataset, cfg.per_dataset("dataset_config"),
                                 cfg.per_dataset("data_dir"), cfg.per_dataset("split"))


class EmptyEval(str):
    """Says which eval rows tokenizing dropped, every one, and why (the filter report)."""


def _load_one(cfg: TrainConfig, accelerator: Accelerator, tokenizer, dataset: str, given: str,
              mixed: bool = False, processor=None, **settings):
    """One dataset's `(train pairs, eval pairs or None, filter report)`; errors name it.

    Eval rows that tokenizing drops every one of stop a run of one dataset (the training pairs are
    fine: the message names the eval rows and the reasons); in a mixture (`mixed`) they come back
    as an `EmptyEval`, and the other datasets are evaluated."""
    tokenize = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                    chat_template=cfg.chat_template, prompt_template=cfg.prompt_template,
                    chat_template_kwargs=cfg.chat_template_kwargs,
                    tools=read_tools_file(cfg.tools_file) if cfg.tools_file else None,
                    strict=cfg.strict_data, num_proc=cfg.num_proc,
                    cache_dir=default_cache_dir() if cfg.tokenize_cache else None,
                    log=accelerator.print)
    try:
        # Every process draws the rows itself: the draw depends only on the seed and the data.
        train_rows, eval_rows = data.load_preference_splits(
            dataset, num_proc=cfg.num_proc, eval_dataset_config=cfg.eval_dataset_config,
            eval_data_dir=cfg.eval_data_dir, eval_split=cfg.eval_split,
            streaming=cfg.streaming, shuffle_buffer_size=cfg.shuffle_buffer_size, **settings)
        if holds_prompts_only(train_rows):  # eval rows are read in the same format
            raise ValueError("its rows are prompts only (format prompts): online DPO answers "
                             "them (--rounds, see docs/online.md); train.py needs preference "
                             "pairs")
        if ranked.is_ranked(train_rows) or ranked.is_ranked(eval_rows):
            check_ranked_run(cfg)
            for rows in (train_rows, eval_rows):
                if ranked.is_ranked(rows):
                    ranked.check_response_count(rows, cfg.max_responses)
        elif is_unpaired(cfg.loss_type):  # KTO takes pairs too, as two labelled completions
            train_rows, eval_rows = map(unpaired.as_unpaired, (train_rows, eval_rows))
        elif unpaired.is_unpaired(train_rows):
            raise ValueError("its rows are unpaired (prompt, completion, label): they train with "
                             "--loss-type kto, not with loss_type "
                             f"{', '.join(cfg.loss_type)}, which needs pairs")
        tokenize["processor"] = images.processor_for([train_rows, eval_rows], processor, cfg.model)
        train, report = tokenize_cached(train_rows, tokenizer, **tokenize)
        if not len(eval_rows):
            return train, None, report
        what = _eval_rows_named(cfg, settings["split"], eval_rows)
        try:
            evals = tokenize_cached(eval_rows, tokenizer, **tokenize)[0]
        except NoPairsLeft as e:
            empty = EmptyEval(f"none is left of {what}: {e.report}")
            if mixed:
                return train, empty, report
            raise ValueError(f"eval pairs: {empty} (the {report.kept} training pairs are "
                             "kept); choose other eval rows (--eval-split), or --eval-samples 0 "
                             "to train without eval") from None
        except ValueError as e:
            raise ValueError(f"eval pairs ({what}): {e}") from None
        # A judge renders the prompts with its own chat template.
        evals = evals.add_column("prompt_messages", _prompts_of(eval_rows, evals),
                                 feature=eval_rows.features["prompt"])
    except (DatasetGenerationError, FileNotFoundError) as e:
        raise ConfigError(f"dataset {given}: {_root_message(e)}") from None
    except ValueError as e:
        raise ConfigError(f"dataset {given}: {e}") from None
    return train, evals, report


def check_ranked_run(cfg: TrainConfig) -> None:
    """ValueError (one line) for a setting that ranked rows do not train with: the ranking
    losses (`dpo.loss.ranked`) generalise DPO's sigmoid loss alone, on a reference forward."""
    refused = [
        (list(cfg.loss_type) != ["sigmoid"], f"loss_type {', '.join(cfg.loss_type)} (and "
         "rpo_alpha) reads pairs; rankings train with loss_type sigmoid"),
        (bool(cfg.label_smoothing), "label_smoothing has no ranking form"),
        (cfg.f_divergence_type != "reverse_kl", f"f_divergence_type {cfg.f_divergence_type} "
         "has no ranking form (Plackett–Luce is written in the reverse KL's rewards)"),
        (cfg.use_weighting, "use_weighting (WPO) weights pairs"),
        (cfg.ld_alpha is not None, "ld_alpha (LD-DPO) compares a pair's two lengths"),
        (cfg.precompute_ref_logps, "precompute_ref_logps stores two log-probs a row; drop it"),
    ]
    why = next((why for bad, why in refused if bad), None)
    if why:
        raise ValueError(f"its rows are rankings: {why}")


def _eval_rows_named(cfg: TrainConfig, split: str, eval_rows) -> str:
    """Which rows `eval_rows` are, as the user chose them (or the defaults did)."""
    if cfg.eval_dataset:
        return f"eval_dataset {cfg.eval_dataset}, split {cfg.eval_split or eval_rows.split}"
    if cfg.eval_split and cfg.eval_split != split:
        return f"eval_split {cfg.eval_split}"
    if str(eval_rows.split) != split.split("[")[0]:
        return f"its {eval_rows.split} split"
    return f"the {len(eval_rows)} rows held out of the draw"


def _prompts_of(rows, tokenized) -> list[list[dict]]:
    """The prompt messages of the `tokenized` pairs: the `rows` they were made from, matched by
    their `row_index` (the row in the source split, or the position when rows have none)."""
    indices = rows["row_index"] if "row_index" in rows.column_names else range(len(rows))
    position = {index: i for i, index in enumerate(indices)}
    return rows.select([position[i] for i in tokenized["row_index"]])["prompt"]


def build_dataloaders(cfg: TrainConfig, accelerator: Accelerator, train_ds, eval_ds, collate):
    """`(train_loader, eval_loader or None, sampler)`, not yet prepared.

    The sampler's global batch is per-device batch × processes × accumulation: the pairs of each
    optimizer step are the same however the run is laid out (see `LengthGroupedBatchSampler`).
    """
    sampler = data.LengthGroupedBatchSampler(
        train_ds["length"], micro_batch_size=cfg.batch_size, seed=cfg.seed,
        global_batch_size=cfg.batch_size * accelerator.num_processes
        * cfg.gradient_accumulation_steps, group_by_length=cfg.group_by_length)
    # Its own generator: creating an iterator draws a seed, which from the global generator
    # would shift the stream LoRA dropout draws from after a resume (not bit-exact).
    train_loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate,
                              generator=torch.Generator().manual_seed(cfg.seed))
    return train_loader, eval_ds and eval_loader_of(cfg, eval_ds, collate), sampler


def eval_loader_of(cfg: TrainConfig, eval_ds, collate) -> DataLoader:
    """The eval pairs in order, `eval_batch_size` at a time (not yet prepared)."""
    return DataLoader(eval_ds, batch_size=cfg.eval_batch_size or cfg.batch_size,
                      collate_fn=collate)


def check_local_files(dataset: str) -> None:
    """Fail early, with the file's name, on a local data file that is missing, empty or not
    UTF-8 — cases that `datasets` reports obscurely (StopIteration) or not at all."""
    path = Path(dataset)
    if not path.exists():
        if dataset.startswith((".", "/", "~")) or path.suffix in (*TEXT_SUFFIXES, ".parquet"):
            raise ConfigError(f"dataset {dataset}: no such file or directory")
        return  # a hub name: datasets.load_dataset resolves it
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    data_suffixes = (*TEXT_SUFFIXES, ".parquet")
    if not any(f.suffix in data_suffixes and not f.name.startswith(".") for f in files):
        raise ConfigError(f"dataset {dataset}: no data file (.json, .jsonl, .jsonl.gz, .parquet, "
                          ".csv) found there")
    for file in files:
        if file.name.startswith(".") or file.suffix not in TEXT_SUFFIXES:
            continue
        try:
            _check_utf8(file)
        except OSError as e:
            raise ConfigError(f"dataset {file}: cannot read it ({e})") from None


def _check_utf8(file: Path) -> None:
    """Decode the file in 1 MiB chunks (it may be large) and require some non-blank text."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    blank = True
    with (gzip.open if file.suffix == ".gz" else open)(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line = lines + chunk[:e.start].count(b"\n") + 1
                raise ConfigError(f"dataset {file}: not UTF-8 text (line {line}, byte "
                                  f"{offset + e.start}); re-encode the file as UTF-8") from None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
            blank = blank and not chunk.strip()
    if blank:
        raise ConfigError(f"dataset {file}: the file is empty")


@contextlib.contextmanager
def _quiet_datasets_logger():
    """`datasets` logs a broken file's error before raising it; the ConfigError we raise says the
    same in one line, so its own log lines are held back while loading."""
    logger = datasets.utils.logging.get_logger()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_message(error: BaseException) -> str:
    """The most telling first line in the chain of causes: for a broken JSON line, pyarrow's
    "JSON parse error ... in row N" rather than datasets' "An error occurred while generating"."""
    messages = []
    while error is not None:
        messages.append((str(error).strip().splitlines() or [type(error).__name__])[0])
        error = error.__cause__ or error.__context__
    return next((m for m in messages if " row " in m), messages[-1])
