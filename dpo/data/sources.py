"""Loading preference rows: a hub dataset or local files, a seeded draw and the eval hold-out
(`dpo.data.draw`), and normalisation of every row to messages (`dpo.data.formats`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, load_dataset
from datasets.data_files import DataFilesDict, get_data_patterns

from dpo.data.draw import (SHUFFLE_BUFFER_SIZE, _check_disjoint, _drawn_rows, _held_out, _slice,
                           _split_name, _streamed_splits, default_eval_samples)
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


@dataclass(frozen=True)
class Source:
    """Where rows come from: ``load_dataset(dataset, name=config, data_dir=data_dir)``."""

    dataset: str
    config: str | None = None
    data_dir: str | None = None


def uses_streaming(dataset: str, streaming: bool | None, num_samples: int | None) -> bool:
    """``streaming`` if set; by default on for a hub dataset (not a local path) when only
    ``num_samples`` rows are wanted, so that drawing them never downloads the whole dataset."""
    if streaming is not None:
        return streaming
    return num_samples is not None and not Path(dataset).exists()


def check_streaming(streaming: bool | None, num_samples: int | None, split: str | None,
                    eval_split: str | None) -> None:
    """ValueError for what a streamed draw cannot do: draw every row, or read a slice."""
    if not streaming:
        return
    if num_samples is None:
        raise ValueError("streaming draws num_samples rows, and num_samples is none; set "
                         "--num-samples, or --no-streaming to load every row")
    for name, value in (("split", split), ("eval_split", eval_split)):
        if value is not None and "[" in value:
            raise ValueError(f"{name} {value!r}: a slice cannot be streamed; drop the slice "
                             "(num_samples draws from the whole split) or pass --no-streaming")


def _load_splits(source: Source | str, split: str = "train", streaming: bool = False):
    """Every split of a hub dataset, a local file (as ``split``) or folder: a ``DatasetDict``, or
    an ``IterableDatasetDict`` when streaming (which reads nothing but the file list)."""
    if isinstance(source, str):
        source = Source(source)
    path = Path(source.dataset)
    if path.is_file():
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        if suffix not in LOCAL_BUILDERS:
            raise ValueError(
                f"{path}: cannot load {suffix!r} files; expected one of {sorted(LOCAL_BUILDERS)}"
            )
        if source.config or source.data_dir:
            raise ValueError(f"{path} is a file: dataset_config and data_dir apply to a folder "
                             "or a hub dataset; drop them")
        return load_dataset(LOCAL_BUILDERS[suffix], data_files={_split_name(split): str(path)},
                            streaming=streaming)
    # A folder or a hub name: datasets infers the builder and the splits from the file names.
    try:
        return load_dataset(source.dataset, source.config, data_dir=source.data_dir,
                            streaming=streaming)
    except ConnectionError as e:
        raise ValueError(
            f"cannot reach {source.dataset!r} on the Hugging Face Hub ({e}); offline (or with "
            f"HF_HUB_OFFLINE=1) download it where there is network (hf download "
            f"{source.dataset} --repo-type dataset --local-dir DIR) and pass --dataset DIR"
        ) from None
    except FileNotFoundError as e:
        if source.data_dir is None:
            raise
        raise ValueError(f"data_dir {source.data_dir!r}: {e}; "
                         f"{_data_folders(path) or 'see the dataset page for its folders'}"
                         ) from None
    except ValueError as e:
        if source.config is None or "BuilderConfig" not in str(e):
            raise
        raise ValueError(f"dataset_config {source.config!r}: {e}") from None


def _data_folders(root: Path) -> str:
    """The folders of a local dataset that hold data files, to suggest as ``data_dir``."""
    if not root.is_dir():
        return ""
    folders = sorted({str(f.parent.relative_to(root)) for f in root.rglob("*")
                      if f.is_file() and _is_data_file(f)})
    return f"folders with data files: {', '.join(folders)}" if folders else ""


def _is_data_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(tuple(LOCAL_BUILDERS))



def layout_warning(dataset: str, data_dir: str | None) -> str | None:
    """One line when ``datasets`` would silently leave out data files of a local folder.

    A folder laid out like ``lvwerra/stack-exchange-paired`` (``data/rl``, ``data/evaluation``,
    ``data/finetune``, ...) loaded whole makes ``datasets`` take split names from file paths:
    ``data/evaluation`` becomes the ``test`` split and every file that names no split is dropped.
    """
    root = Path(dataset)
    if data_dir is not None or not root.is_dir():
        return None
    files = {f.resolve() for f in root.rglob("*") if f.is_file() and _is_data_file(f)}
    patterns = get_data_patterns(str(root.resolve()))
    used = {Path(f).resolve() for files_ in
            DataFilesDict.from_patterns(patterns, base_path=str(root.resolve())).values()
            for f in files_}
    left_out = files - used
    if not left_out:
        return None
    folders = sorted({str(f.parent.relative_to(root.resolve())) for f in left_out})
    splits = ", ".join(map(str, patterns))
    return (f"warning: dataset {dataset}: datasets takes its splits ({splits}) from "
            f"file paths and leaves out {len(left_out)} of its {len(files)} data files (in "
            f"{', '.join(folders)}); pick one folder with --data-dir (e.g. --data-dir "
            f"{folders[0]})")



def load_preference_splits(
    dataset: str,
    *,
    num_samples: int | None,
    eval_samples: int | None,
    seed: int,
    data_format: str | None = None,
    split: str = "train",
    num_proc: int | None = None,
    dataset_config: str | None = None,
    data_dir: str | None = None,
    eval_dataset: str | None = None,
    eval_dataset_config: str | None = None,
    eval_data_dir: str | None = None,
    eval_split: str | None = None,
    streaming: bool | None = None,
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
) -> tuple[Dataset, Dataset]:
    """Load preference data and return normalised (train, eval) datasets.

    ``dataset`` is a hub name (e.g. ``lvwerra/stack-exchange-paired``) or a local
    ``.json``/``.jsonl``/``.jsonl.gz``/``.parquet``/``.csv`` file or a folder of them;
    ``dataset_config`` and ``data_dir`` pick a config (subset) and a subfolder of it, as
    ``load_dataset(dataset, dataset_config, data_dir=data_dir)`` does.
    ``num_samples`` rows of ``split`` (a slice such as ``train[:5%]`` works when not streaming)
    are drawn with a seeded shuffle (``None``: all rows, still shuffled).

    Eval rows come from ``eval_split`` of the eval source (``eval_dataset``,
    ``eval_dataset_config``, ``eval_data_dir``; by default the train source). Without
    ``eval_split``: the source's ``test`` (else ``validation``) split when it has one; otherwise
    ``eval_samples`` of the drawn rows are held out and never train (a separate eval source must
    then name its split); so are they when ``eval_split`` equals ``split``. A slice of the training
    split (``--split train[:80%] --eval-split train[80%:]``) is read as written, and refused where
    it overlaps ``split``. ``eval_samples=None`` means ``default_eval_samples(num_samples)``, and
    every row of an ``eval_split`` slice; 0 means no eval data. ``data_format`` (one of
    ``DATA_FORMATS``) overrides the detected format.

    ``streaming`` (default: on for a hub dataset when ``num_samples`` is set, see
    ``uses_streaming``) reads rows as a stream, shuffled with ``seed`` over the shards and through
    a buffer of ``shuffle_buffer_size`` rows (default 10,000), and stops after the rows it needs:
    the whole dataset is never downloaded or read (see ``_take``).

    The rows come out in the schema of ``dpo.data.formats`` (``prompt``/``chosen``/``rejected``
    message lists, ``problem`` for rows to skip, ``row_index``: the row in the source split, or
    under streaming its place in the streamed draw).
    """
    train_source = Source(dataset, dataset_config, data_dir)
    inherit = eval_dataset is None or eval_dataset == dataset
    eval_source = Source(
        eval_dataset or dataset,
        eval_dataset_config if eval_dataset_config is not None or not inherit else dataset_config,
        eval_data_dir if eval_data_dir is not None or not inherit else data_dir,
    )
    streamed = uses_streaming(dataset, streaming, num_samples)
    check_streaming(streamed, num_samples, split, eval_split)

    splits = _load_splits(train_source, split, streamed)
    base = _split_name(split)
    if base not in splits:
        raise ValueError(f"{_where(train_source)} has no split {split!r}; it has {sorted(splits)}")
    same = eval_source == train_source
    eval_splits = splits if same else _load_splits(eval_source, eval_split or "train", streamed)
    if eval_split is not None:
        if _split_name(eval_split) not in eval_splits:
            raise ValueError(f"{_where(eval_source)} has no split {eval_split!r} (eval_split); "
                             f"it has {sorted(eval_splits)}")
        # The training split itself: its eval rows are held out of the draw.
        eval_name = None if same and eval_split == split else eval_split
    else:
        eval_name = next((name for name in EVAL_SPLITS
                          if name in eval_splits and not (same and name == base)), None)
        if eval_name is None and not same:
            raise ValueError(f"{_where(eval_source)} (the eval data) has no test or validation "
                             f"split; name one with --eval-split (it has {sorted(eval_splits)})")
    if streamed:
        return _streamed_splits(splits[base], eval_name and eval_splits[eval_name],
                                num_samples, eval_samples, seed, shuffle_buffer_size,
                                data_format, num_proc, eval_name)

    source = splits[base]
    # Resolve once, so that the eval rows are read the same way as the train rows.
    data_format = resolve_format(source.features, data_format).name
    # Rows are drawn by their place in the slice and named by their row in the split.
    train_slice = _slice(split, len(source))
    train_rows = _drawn_rows(train_slice, num_samples, seed, "num_samples")
    if not train_rows:
        raise ValueError(f"num_samples={num_samples} leaves nothing to train on")

    if eval_name is not None:
        eval_source_rows = eval_splits[_split_name(eval_name)]
        eval_slice = _slice(eval_name, len(eval_source_rows))
        if same and _split_name(eval_name) == base:
            _check_disjoint(split, train_slice, eval_name, eval_slice)
        if eval_samples is None and "[" in eval_name:  # a slice names its rows: all of them
            eval_samples = sum(map(len, eval_slice))
        elif eval_samples is None:
            eval_samples = min(len(eval_source_rows), default_eval_samples(len(train_rows)))
        eval_rows = _drawn_rows(eval_slice, eval_samples, seed, f"eval_samples ({eval_name})")
    else:
        eval_source_rows = source
        eval_samples = _held_out(eval_samples, len(train_rows))
        # The drawn rows are already shuffled, so their first rows are a random hold-out.
        eval_rows, train_rows = train_rows[:eval_samples], train_rows[eval_samples:]

    def prepare(ds: Dataset, rows: list[int]) -> Dataset:
        return normalise(
            ds.select(rows), data_format=data_format, row_indices=rows, num_proc=num_proc
        )

    return prepare(source, train_rows), prepare(eval_source_rows, eval_rows)


def _where(source: Source) -> str:
    extra = [f"{k} {v}" for k, v in (("dataset_config", source.config),
                                      ("data_dir", source.data_dir)) if v is not None]
    return source.dataset + (f" ({', '.join(extra)})" if extra else "")
