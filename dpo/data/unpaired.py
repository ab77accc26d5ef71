"""Unpaired rows (KTO): one completion and a boolean label each, desirable or not.

A paired dataset becomes unpaired by splitting each pair into its chosen completion (label true)
and its rejected one (label false), as TRL's `unpair_preference_dataset` does. Unpaired rows
travel through the pair pipeline as pairs whose two responses are the same completion; the
collator then replaces the second with the KL estimate's mismatched completion
(`with_kl_completions`), so one forward over `[completions; mismatched]` serves both.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from datasets import Dataset

from dpo.data.formats import UNPAIRED_FEATURES
from dpo.data.tokenize import IGNORE_INDEX


def is_unpaired(ds: Dataset) -> bool:
    """Whether normalised or tokenized rows are unpaired (they carry a `label`)."""
    return "label" in ds.column_names


def as_unpaired(ds: Dataset) -> Dataset:
    """Normalised rows as unpaired ones: each pair gives its chosen response (label true), then
    its rejected one (label false), both with the pair's `row_index`; unpaired rows as they are.
    A pair's problem goes to both of its rows."""
    if is_unpaired(ds):
        return ds
    if "images" in ds.column_names:
        raise ValueError("its rows have images: unpaired losses (KTO) do not take images yet; "
                         "vision data trains as pairs")

    def split(batch: dict[str, list]) -> dict[str, list]:
        out = {name: [] for name in UNPAIRED_FEATURES}
        for values in zip(*batch.values()):
            row = dict(zip(batch, values))
            for side, label in (("chosen", True), ("rejected", False)):
                for name in UNPAIRED_FEATURES:
                    out[name].append(row.get(name))
                out["chosen"][-1] = out["rejected"][-1] = row[side]
                out["label"][-1] = label
        return out

    return ds.map(split, batched=True, remove_columns=ds.column_names,
                  features=UNPAIRED_FEATURES, desc="unpairing preference pairs")


def check_both_classes(ds: Dataset) -> None:
    """ValueError unless tokenized unpaired rows hold desirable and undesirable completions."""
    desirable = sum(ds["label"])
    if desirable in (0, len(ds)):
        kind = "desirable" if desirable else "undesirable"
        raise ValueError(f"all {len(ds)} rows are {kind} (label {bool(desirable)}): KTO needs "
                         "desirable and undesirable completions to learn what to move "
                         "towards and away from")


def with_kl_completions(rows: Sequence[Mapping], max_length: int | None) -> list[dict]:
    """Tokenized unpaired rows with their rejected slot holding the KL estimate's mismatched
    completion: row i's prompt with row i − 1's completion (the last row's for the first), the
    rotation TRL's KTOTrainer and the KTO paper's code make within a batch. The completion keeps
    its start within `max_length`. A batch of one row has no other completion: its own is used
    (the config refuses batch sizes under 2; a lone last batch may still have one row)."""
    prompts, completions = [], []
    for row in rows:
        labels = row["chosen_labels"]
        start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompts.append(list(row["chosen_input_ids"][:start]))
        completions.append(list(row["chosen_input_ids"][start:]))
    out = []
    for i, row in enumerate(rows):
        prompt, completion = prompts[i], completions[i - 1]
        if max_length is not None:
            completion = completion[:max(max_length - len(prompt), 1)]
        out.append({**row, "rejected_input_ids": prompt + completion,
                    "rejected_labels": [IGNORE_INDEX] * len(prompt) + completion})
    return out
