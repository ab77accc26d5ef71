"""Which rows are drawn: a seeded draw out of a split or its slices, the eval hold-out, and
the seeded streamed draw that reads only the drawn rows (`dpo.data.sources` loads the splits)."""
from __future__ import annotations

import itertools

import numpy as np
from datasets import Dataset, IterableDataset, ReadInstruction

from dpo.data.formats import normalise, resolve_format
from dpo.data.images import undecoded

MAX_DEFAULT_EVAL_SAMPLES = 200
# Rows in the buffer of a streamed shuffle: each drawn row is picked at random out of this many,
# so a draw reads about num_samples + this many rows (memory: this many rows).
SHUFFLE_BUFFER_SIZE = 10_000


def default_eval_samples(num_train_rows: int) -> int:
    """10% of the drawn rows, at least 1 when there are two or more, at most 200."""
    return min(MAX_DEFAULT_EVAL_SAMPLES, max(1 if num_train_rows >= 2 else 0, num_train_rows // 10))


def _split_name(split: str) -> str:
    """``train`` out of ``train[:5%]``."""
    return split.split("[", 1)[0].strip()


def _draw(num_rows: int, count: int | None, seed: int, what: str) -> list[int]:
    """``count`` row indices out of ``num_rows`` by a seeded shuffle (all of them for None)."""
    if count is None:
        count = num_rows
    if not 0 <= count <= num_rows:
        raise ValueError(f"{what}={count} but the split has {num_rows} rows; ask for at most "
                         f"{num_rows} (--{what.split()[0].replace('_', '-')} none takes all)")
    return np.random.default_rng(seed).permutation(num_rows)[:count].tolist()


def _slice(split: str, num_rows: int) -> list[range]:
    """The rows of ``split`` (``train``, or a slice such as ``train[80%:]``) of a split of
    ``num_rows`` rows, as ranges of its row indices."""
    base = _split_name(split)
    if split == base:
        return [range(num_rows)]
    try:
        parts = ReadInstruction.from_spec(split).to_absolute({base: num_rows})
    except (ValueError, AssertionError) as e:
        raise ValueError(f"split {split!r}: {e}") from None
    return [range(part.from_, part.to) for part in parts]


def _check_disjoint(split: str, train: list[range], eval_split: str, evals: list[range]) -> None:
    """ValueError when eval rows of the same split would also be drawn to train."""
    shared = [range(max(a.start, b.start), min(a.stop, b.stop)) for a in train for b in evals]
    shared = [r for r in shared if r]
    if shared:
        rows = sum(map(len, shared))
        raise ValueError(
            f"eval_split {eval_split!r} overlaps split {split!r} in {rows} rows (from row "
            f"{min(r.start for r in shared)}); give slices that do not overlap (--split "
            f"train[:80%] --eval-split train[80%:]), or the same split to hold out drawn rows")


def _take(source: IterableDataset, count: int, seed: int, buffer_size: int, what: str,
          fewer_ok: bool = False) -> Dataset:
    """The first ``count`` rows of a seeded streamed shuffle, in memory.

    ``IterableDataset.shuffle`` shuffles the order of the shards (files) with ``seed``, then draws
    each row at random out of a buffer of ``buffer_size`` rows that refills as it goes: reading
    stops after about ``count + buffer_size`` rows. The rows depend only on the seed and the data,
    so every process that draws them itself gets the same ones, on every run and resume.
    """
    stream = source.shuffle(seed=seed, buffer_size=buffer_size)
    rows = list(itertools.islice(stream, count))
    if len(rows) < count and not fewer_ok:
        raise ValueError(f"{what}={count} but the streamed split has only {len(rows)} rows; ask "
                         f"for at most {len(rows)}")
    return Dataset.from_list(rows, features=source.features, split=source.split)

def _drawn_rows(parts: list[range], count: int | None, seed: int, what: str) -> list[int]:
    """``_draw`` from the rows of a slice (``_slice``): their row indices in the split."""
    rows = parts[0] if len(parts) == 1 else list(itertools.chain(*parts))
    return [rows[i] for i in _draw(len(rows), count, seed, what)]


def _held_out(eval_samples: int | None, drawn: int) -> int:
    if eval_samples is None:
        eval_samples = default_eval_samples(drawn)
    if not 0 <= eval_samples < drawn:
        raise ValueError(
            f"eval_samples={eval_samples} must leave training rows out of the "
            f"{drawn} drawn (the dataset has no test split to take eval rows from)"
        )
    return eval_samples


def _streamed_splits(source: IterableDataset, eval_source: IterableDataset | None,
                     num_samples: int, eval_samples: int | None, seed: int, buffer_size: int,
                     data_format: str | None, num_proc: int | None,
                     eval_name: str | None) -> tuple[Dataset, Dataset]:
    """``load_preference_splits`` on streams: only the drawn rows are ever read."""
    # Images as their bytes: decoded while streaming, a JPEG would be re-encoded on the way.
    source, eval_source = undecoded(source), eval_source and undecoded(eval_source)
    drawn = _take(source, num_samples, seed, buffer_size, "num_samples")
    if eval_source is None:
        held = _held_out(eval_samples, num_samples)
        train = drawn.select(range(held, num_samples))
        evals = drawn.select(range(held))
        train_index, eval_index = list(range(held, num_samples)), list(range(held))
    else:
        train, train_index = drawn, list(range(num_samples))
        count = default_eval_samples(num_samples) if eval_samples is None else eval_samples
        evals = _take(eval_source, count, seed, buffer_size, f"eval_samples ({eval_name})",
                      fewer_ok=eval_samples is None)
        eval_index = list(range(len(evals)))
    data_format = resolve_format(drawn.features, data_format).name
    return tuple(normalise(ds, data_format=data_format, row_indices=index, num_proc=num_proc)
                 for ds, index in ((train, train_index), (evals, eval_index)))
