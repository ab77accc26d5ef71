"""The tokenized pairs cached on disk, one folder per key, so that tokenizing happens once.

``datasets`` caches ``Dataset.map`` results only for datasets backed by files, and the rows the
trainer tokenizes are drawn (``select``) and normalised in memory, so every run, resume and
process would tokenize them again. ``tokenize_cached`` keys the result on the content of the rows
(an in-memory dataset's ``_fingerprint`` is random), the tokenizer, every setting passed to
``tokenize_preferences`` and the source of the modules that decide the tokens and the report
(``dpo.data.fingerprint.TOKENS_CODE``), and keeps it under ``$DPO_CACHE_DIR/tokenized`` (else
``~/.cache/dpo/tokenized``): a ``Dataset.save_to_disk`` folder and the ``FilterReport`` as JSON,
so a hit reports the same rows kept and dropped.

An entry is written into a temporary folder and renamed into place (atomic): a reader sees the
whole entry or none. A folder that does not check out on load (key, format, row count) is
ignored and rewritten.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import datasets
import jinja2
import pyarrow as pa
import pyarrow.compute as pc
import tokenizers
import transformers
from datasets import Dataset, load_from_disk
from datasets.fingerprint import Hasher

from dpo.paths import cache_root
from dpo.data.fingerprint import code_source
from dpo.data.report import FilterReport
from dpo.data.vision_tokenize import processor_settings, tokenize_pairs

# Bump when the layout of an entry changes: older entries then miss.
CACHE_FORMAT_VERSION = 1
REPORT_FILE = "report.json"
# Settings that change how the work is done, not its result: keyed, a --num-proc 4 run would
# miss the cache a --num-proc 1 run wrote.
UNKEYED_SETTINGS = ("num_proc",)
# Rows per block when hashing: bounds the memory a block takes, whatever the dataset's size.
HASH_BLOCK_ROWS = 8192


def default_cache_dir() -> Path:
    """``$DPO_CACHE_DIR/tokenized``, else ``~/.cache/dpo/tokenized`` (as the reference cache)."""
    return cache_root() / "tokenized"


def rows_digest(ds: Dataset) -> str:
    """sha256 of the rows' content: schema and every value, in order, read from Arrow.

    Equal rows hash equally however the dataset was built (sliced, index-mapped, chunked):
    nested columns are taken apart into their leaves, each written as Arrow IPC, which writes
    only the values a sliced leaf holds (a sliced list column would carry its whole child).
    """
    digest = hashlib.sha256(f"{len(ds)} rows".encode())
    for table in ds.with_format("arrow").iter(HASH_BLOCK_ROWS):
        digest.update(str(table.schema).encode())
        for column in table.combine_chunks().columns:
            for leaf in _leaves(column.combine_chunks()):
                sink = pa.BufferOutputStream()
                batch = pa.RecordBatch.from_arrays([leaf], ["v"])
                with pa.ipc.new_stream(sink, batch.schema) as writer:
                    writer.write_batch(batch)
                digest.update(sink.getvalue())
    return digest.hexdigest()


def _leaves(array: pa.Array):
    """The flat arrays that make up ``array``: a list's lengths and values, a struct's fields
    (and its nulls), recursively; only what the array's own rows hold."""
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        yield pc.list_value_length(array)
        yield from _leaves(array.flatten())
    elif pa.types.is_struct(array.type):
        yield array.is_null()
        for child in array.flatten():
            yield from _leaves(child)
    else:
        yield array


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides the tokenizer's output: its serialised form (vocabulary, merges,
    normaliser, added tokens), chat template, special tokens and class."""
    if tokenizer.is_fast:
        serialised = tokenizer.backend_tokenizer.to_str()
    else:  # a slow tokenizer has no serialised form; datasets' pickling hash covers its state
        serialised = Hasher.hash(tokenizer)
    parts = [
        type(tokenizer).__qualname__,
        serialised,
        tokenizer.chat_template,
        # Set in Python, outside the serialised form: prepare_tokenizer's pad, a custom EOS.
        {name: str(value) for name, value in tokenizer.special_tokens_map.items()},
        [tokenizer.bos_token_id, tokenizer.eos_token_id],
        # Whether it adds BOS may be decided in Python (add_bos_token) rather than the backend.
        tokenizer("a")["input_ids"],
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def cache_key(ds: Dataset, tokenizer, settings: dict) -> str:
    """The hex key of what ``tokenize_preferences(ds, tokenizer, **settings)`` returns."""
    processor = settings.get("processor")
    parts = {
        "format": CACHE_FORMAT_VERSION,
        "rows": rows_digest(ds),  # a vision row's image bytes included
        "tokenizer": tokenizer_digest(tokenizer),
        "settings": {k: v for k, v in settings.items()
                     if k not in (*UNKEYED_SETTINGS, "processor")},
        "code": hashlib.sha256(code_source().encode()).hexdigest(),
        "versions": [transformers.__version__, tokenizers.__version__, jinja2.__version__,
                     datasets.__version__],
    }
    if processor is not None:  # a vision model's: its tokenizer, template and image settings
        parts["processor"] = [tokenizer_digest(processor.tokenizer),
                              processor_settings(processor)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tokenize_cached(
    ds: Dataset,
    tokenizer,
    *,
    cache_dir: str | Path | None,
    log: Callable[[str], None] = print,
    **settings,
) -> tuple[Dataset, FilterReport]:
    """``tokenize_pairs(ds, tokenizer, **settings)`` (``tokenize_preferences``, or with a vision
    model's ``processor`` its vision variant), loaded from ``cache_dir`` when an
    earlier call (another run, or the first process of this one) saved the same result there.

    ``settings`` go to ``tokenize_preferences`` as they are and all but ``UNKEYED_SETTINGS``
    into the key, so a setting added there is keyed without a change here. ``cache_dir`` None
    tokenizes without the cache. Errors (strict mode, no usable rows) are raised, not cached.
    ``log`` gets one line saying where the pairs came from.
    """
    if cache_dir is None:
        return tokenize_pairs(ds, tokenizer, **settings)
    key = cache_key(ds, tokenizer, settings)
    path = Path(cache_dir) / key[:40]
    cached = _load(path, key)
    if cached is not None:
        log(f"tokenized pairs: {len(cached[0])} loaded from cache {path}")
        return cached
    tokenized, report = tokenize_pairs(ds, tokenizer, **settings)
    if _save(path, key, tokenized, report):
        log(f"tokenized pairs: {len(tokenized)} saved to cache {path}")
        # The saved copy is memory-mapped: the same dataset a hit returns, with no rows in RAM.
        return _load(path, key) or (tokenized, report)
    return tokenized, report


def _save(path: Path, key: str, tokenized: Dataset, report: FilterReport) -> bool:
    """Write the entry atomically: readers see no folder at ``path`` until all of it is there.
    False when it could not be written (a read-only or full disk costs the cache, not the run).
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tokenized.save_to_disk(str(tmp))
        meta = {"key": key, "format": CACHE_FORMAT_VERSION, "rows": len(tokenized),
                "report": dataclasses.asdict(report)}
        (tmp / REPORT_FILE).write_text(json.dumps(meta))
        if path.exists():  # a broken entry (_load said so), or a concurrent writer's
            stale = path.with_name(f".{path.name}.{uuid.uuid4().hex}.stale")
            # A reader's memory map of the old files survives their removal (POSIX).
            os.replace(path, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / REPORT_FILE).is_file():
                raise
            # Another process renamed its entry into place first: the same key, the same rows.
        return True
    except OSError as e:
        warnings.warn(f"could not write the tokenized-data cache {path}: {e}", stacklevel=3)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path, key: str) -> tuple[Dataset, FilterReport] | None:
    """The cached pairs and report if ``path`` holds exactly what ``key`` names, else None."""
    meta_file = path / REPORT_FILE
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        problem = ("another key" if meta.get("key") != key
                   else "another format" if meta.get("format") != CACHE_FORMAT_VERSION
                   else None)
        if problem is None:
            tokenized = load_from_disk(str(path))
            report = FilterReport(**meta["report"])
            if not len(tokenized) == meta["rows"] == report.kept:
                problem = "a different row count"
    except (OSError, ValueError, TypeError, KeyError) as e:
        problem = f"an unreadable entry ({type(e).__name__}: {e})"
    if problem is not None:
        warnings.warn(f"ignoring tokenized-data cache {path}: {problem}; tokenizing again",
                      stacklevel=3)
        return None
    return tokenized, report
