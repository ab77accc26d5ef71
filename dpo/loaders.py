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
from dpo.data.sources import layout_warning

TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".gz")


def build_datasets(cfg: TrainConfig, accelerator: Accelerator, tokenizer):
    """`(train pairs, eval pairs or None, collator)`: loaded, tokenized and validated."""
    dataset = demo.resolve_dataset(cfg.dataset)
    check_local_files(dataset)
    eval_dataset = cfg.eval_dataset and demo.resolve_dataset(cfg.eval_dataset)
    if eval_dataset:
        check_local_files(eval_dataset)
    tokenize = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                    chat_template=cfg.chat_template, prompt_template=cfg.prompt_template,
                    strict=cfg.strict_data, num_proc=cfg.num_proc)
    # Under main_process_first the main process tokenizes and saves; the others load its result.
    cache = dict(cache_dir=default_cache_dir() if cfg.tokenize_cache else None,
                 log=accelerator.print)
    warning = layout_warning(dataset, cfg.data_dir)
    if warning:
        accelerator.print(warning)
    try:
        with accelerator.main_process_first(), _quiet_datasets_logger():
            # Every process draws the rows itself: the draw depends only on the seed and the data.
            train_rows, eval_rows = data.load_preference_splits(
                dataset, num_samples=cfg.num_samples, eval_samples=cfg.eval_samples,
                seed=cfg.seed, data_format=cfg.data_format, num_proc=cfg.num_proc,
                split=cfg.split, dataset_config=cfg.dataset_config, data_dir=cfg.data_dir,
                eval_dataset=eval_dataset,
                eval_dataset_config=cfg.eval_dataset_config, eval_data_dir=cfg.eval_data_dir,
                eval_split=cfg.eval_split, streaming=cfg.streaming,
                shuffle_buffer_size=cfg.shuffle_buffer_size)
            train_ds, report = tokenize_cached(train_rows, tokenizer, **cache, **tokenize)
            eval_ds = (tokenize_cached(eval_rows, tokenizer, **cache, **tokenize)[0]
                       if len(eval_rows) else None)
    except (DatasetGenerationError, FileNotFoundError) as e:
        raise ConfigError(f"dataset {cfg.dataset}: {_root_message(e)}") from None
    except ValueError as e:
        raise ConfigError(f"dataset {cfg.dataset}: {e}") from None
    accelerator.print(f"train pairs: {report}")
    return train_ds, eval_ds, data.PreferenceCollator(tokenizer.pad_token_id)


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
    eval_loader = eval_ds and DataLoader(eval_ds, batch_size=cfg.eval_batch_size or cfg.batch_size,
                                         collate_fn=collate)
    return train_loader, eval_loader, sampler


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
