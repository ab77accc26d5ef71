"""Mixtures: several preference datasets in one run, each drawn on its own.

``--dataset a b c`` trains on rows of all three. ``num_samples`` is shared out among them by
``dataset_weights`` (proportions, normalised; equal by default) or given per dataset by
``dataset_num_samples``; ``eval_samples`` is a total shared out by the same weights. Each dataset
is then loaded, drawn, held out and format-detected on its own by
``dpo.data.sources.load_preference_splits``, with the per-dataset settings of ``PER_DATASET``
(one value for all datasets, or one each) and its own seed (``seed + i``), so that its rows do
not depend on the others. The trainer tokenizes each dataset on its own (a filter report each)
and concatenates them; eval rows keep their dataset's index in a ``source`` column, so that eval
metrics are reported per dataset as well as overall.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from dpo.data.sources import LOCAL_BUILDERS

# Settings that take one value for every dataset of a mixture, or one value each.
PER_DATASET = ("data_format", "dataset_config", "data_dir", "split")


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` shared out in proportion to ``weights``: whole numbers that add up to ``total``
    (largest remainders first, ties to the earlier dataset). Integer weights that add up to
    ``total`` come back unchanged."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def plan(num_samples: int | None, eval_samples: int | None, weights: Sequence[float] | None,
         num_datasets: int) -> list[tuple[int | None, int | None]]:
    """``(num_samples, eval_samples)`` of each dataset. ``None`` stays ``None`` for every dataset
    (all rows; the default eval rows of each dataset's own draw)."""
    weights = weights or [1.0] * num_datasets
    train = [None] * num_datasets if num_samples is None else apportion(num_samples, weights)
    evals = ([eval_samples] * num_datasets if eval_samples is None or num_datasets == 1
             else apportion(eval_samples, weights))
    return list(zip(train, evals))


def check_mixture(datasets: Sequence[str], *, weights: Sequence[float] | None,
                  counts: Sequence[int] | None, num_samples: int | None,
                  per_dataset: dict[str, list | None], eval_dataset: str | None) -> None:
    """ValueError (one line) for a mixture that cannot be drawn as asked."""
    n = len(datasets)
    for name, values in per_dataset.items():
        if values is not None and len(values) not in (1, n):
            raise ValueError(f"{name}: {_count(values, 'value')} for {n} datasets; give one "
                             "value for all of them, or one for each")
    keys = [(d, *(values[i % len(values)] for values in per_dataset.values() if values))
            for i, d in enumerate(datasets)]
    twice = next((d for i, (d, *_) in enumerate(keys) if keys[i] in keys[:i]), None)
    if twice is not None:
        raise ValueError(f"dataset: {twice} is listed twice with the same settings; list it once "
                         "(dataset_weights set its share)")
    if weights is not None and counts is not None:
        raise ValueError("dataset_weights and dataset_num_samples are both set; give one of them")
    for name, values in (("dataset_weights", weights), ("dataset_num_samples", counts)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name}: {_count(values, 'value')} for {n} "
                             f"{'dataset' if n == 1 else 'datasets'} ({', '.join(datasets)}); "
                             "give one for each")
    if weights is not None:
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"dataset_weights must be > 0 (leave a dataset out rather than "
                             f"weigh it 0), got {list(weights)}")
        if num_samples is None:
            raise ValueError("dataset_weights share out num_samples, which is none (every row); "
                             "set --num-samples, or drop the weights")
    if counts is not None:
        if min(counts) < 1:
            raise ValueError(f"dataset_num_samples must be >= 1 each, got {list(counts)}")
        if num_samples != sum(counts):
            raise ValueError(f"num_samples {num_samples} but dataset_num_samples add up to "
                             f"{sum(counts)}; give one of them")
    if num_samples is not None:
        for dataset, (count, _) in zip(datasets, plan(num_samples, None, weights, n)):
            if count == 0:
                shares = "by dataset_weights" if weights else "shared equally"
                raise ValueError(f"dataset {dataset} gets 0 of the num_samples={num_samples} "
                                 f"rows ({shares}); raise num_samples or its weight")
    if eval_dataset is not None and n > 1:
        raise ValueError("eval_dataset: a mixture takes each dataset's eval rows from that "
                         "dataset (its test split, --eval-split, or rows held out), to report "
                         "each; drop eval_dataset")


def _count(items: Sequence, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def dataset_name(dataset: str) -> str:
    """The name a dataset's metrics go under: a hub id's last part, a file's stem, a folder's
    name (``lvwerra/stack-exchange-paired`` → ``stack-exchange-paired``, ``a/hh.jsonl.gz`` →
    ``hh``, ``builtin:demo-preferences`` → ``demo-preferences``)."""
    name = Path(dataset.replace(":", "/").rstrip("/")).name
    suffix = next((s for s in sorted(LOCAL_BUILDERS, key=len, reverse=True)
                   if name.endswith(s)), "")
    return name.removesuffix(suffix) or name


def dataset_names(datasets: Sequence[str], configs: Sequence[str | None],
                  data_dirs: Sequence[str | None], splits: Sequence[str]) -> list[str]:
    """``dataset_name`` of each, told apart where two coincide by their config, data_dir and
    split (``stack-exchange-paired-rl``), else by their place (``hh-2``)."""
    names = [dataset_name(d) for d in datasets]
    qualified = ["-".join([name, *(Path(q).name for q in (config, data_dir) if q),
                           *([split] if split != "train" else [])])
                 if names.count(name) > 1 else name
                 for name, config, data_dir, split in zip(names, configs, data_dirs, splits)]
    return [name if qualified.count(name) == 1 else f"{name}-{i + 1}"
            for i, name in enumerate(qualified)]
