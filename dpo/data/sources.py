"""Loading preference rows: a hub dataset or local files, a seeded draw, the eval hold-out, and
normalisation of every row to messages (`dpo.data.formats`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

from dpo.data.formats import normalise, resolve_format

# The builder datasets.load_dataset needs for a local file, by the file's suffix.
LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
# Splits that serve as eval data when the dataset has them, in order of preference.
EVAL_SPLITS = ("test", "validation")
MAX_DEFAULT_EVAL_SAMPLES = 200


def default_eval_samples(num_train_rows: int) -> int:
    """10% of the drawn rows, at least 1 when there are two or more, at most 200."""
    return min(MAX_DEFAULT_EVAL_SAMPLES, max(1 if num_train_rows >= 2 else 0, num_train_rows // 10))


def _load_splits(dataset: str, split: str) -> DatasetDict:
    """Load every split of a hub dataset, or a local file (as ``split``) or folder."""
    path = Path(dataset)
    if path.is_file():
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        if suffix not in LOCAL_BUILDERS:
            raise ValueError(
                f"{path}: cannot load {suffix!r} files; expected one of {sorted(LOCAL_BUILDERS)}"
            )
        return load_dataset(LOCAL_BUILDERS[suffix], data_files={split: str(path)})
    # A folder or a hub name: datasets infers the builder and the splits from the file names.
    return load_dataset(dataset)


def _draw(num_rows: int, count: int | None, seed: int, what: str) -> list[int]:
    """``count`` row indices out of ``num_rows`` by a seeded shuffle (all of them for None)."""
    if count is None:
        count = num_rows
    if not 0 <= count <= num_rows:
        raise ValueError(f"{what}={count} but the split has {num_rows} rows; ask for at most "
                         f"{num_rows} (--{what.split()[0].replace('_', '-')} none takes all)")
    return np.random.default_rng(seed).permutation(num_rows)[:count].tolist()


def load_preference_splits(
    dataset: str,
    *,
    num_samples: int | None,
    eval_samples: int | None,
    seed: int,
    data_format: str | None = None,
    split: str = "train",
    num_proc: int | None = None,
) -> tuple[Dataset, Dataset]:
    """Load preference data and return normalised (train, eval) datasets.

    ``dataset`` is a hub name (e.g. ``lvwerra/stack-exchange-paired``) or a local
    ``.json``/``.jsonl``/``.jsonl.gz``/``.parquet``/``.csv`` file or a folder of them.
    ``num_samples`` rows of ``split`` are drawn with a seeded shuffle (``None``: all rows, still
    shuffled). Eval rows come from the dataset's ``test`` (else ``validation``) split when it has
    one; otherwise ``eval_samples`` of the drawn rows are held out and never train.
    ``eval_samples=None`` means ``default_eval_samples(num_samples)``; 0 means no eval data.
    ``data_format`` (one of ``DATA_FORMATS``) overrides the format detected from the columns.

    The rows come out in the schema of ``dpo.data.formats`` (``prompt``/``chosen``/``rejected``
    message lists, ``row_index`` in the source split, ``problem`` for rows to skip).
    """
    splits = _load_splits(dataset, split)
    if split not in splits:
        raise ValueError(f"{dataset} has no split {split!r}; it has {sorted(splits)}")
    source = splits[split]
    # Resolve once, so that the eval rows are read the same way as the train rows.
    data_format = resolve_format(source.features, data_format).name
    train_rows = _draw(len(source), num_samples, seed, "num_samples")
    if not train_rows:
        raise ValueError(f"num_samples={num_samples} leaves nothing to train on")

    eval_split = next((name for name in EVAL_SPLITS if name in splits and name != split), None)
    if eval_split is not None:
        eval_source = splits[eval_split]
        if eval_samples is None:
            eval_samples = min(len(eval_source), default_eval_samples(len(train_rows)))
        eval_rows = _draw(len(eval_source), eval_samples, seed, f"eval_samples ({eval_split})")
    else:
        eval_source = source
        if eval_samples is None:
            eval_samples = default_eval_samples(len(train_rows))
        if not 0 <= eval_samples < len(train_rows):
            raise ValueError(
                f"eval_samples={eval_samples} must leave training rows out of the "
                f"{len(train_rows)} drawn (the dataset has no test split to take eval rows from)"
            )
        # The drawn rows are already shuffled, so their first rows are a random hold-out.
        eval_rows, train_rows = train_rows[:eval_samples], train_rows[eval_samples:]

    def prepare(ds: Dataset, rows: list[int]) -> Dataset:
        return normalise(
            ds.select(rows), data_format=data_format, row_indices=rows, num_proc=num_proc
        )

    return prepare(source, train_rows), prepare(eval_source, eval_rows)
