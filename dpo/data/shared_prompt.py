"""Shared-prompt batches: each pair laid out once as `[prompt | chosen | rejected]`.

The chosen and rejected sequences of a pair begin with the same prompt tokens, so a separate
`[chosen; rejected]` batch computes every prompt twice (a ranking of N responses, N times).
Here a pair is one segment of a row: its
prompt (the two sequences' common prefix, up to the first scored token of either), then the
rest of the chosen sequence, then the rest of the rejected one. The rejected tokens' position
ids restart at the prompt's length, so each response sits where it would in its own sequence;
`dpo.model.shared_prompt` builds the attention rule (a response sees the prompt and itself,
never the other response) and lays the model's outputs out as a `[chosen; rejected]` batch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from dpo.data.tokenize import IGNORE_INDEX


def shared_prefix(chosen_ids: Sequence[int], rejected_ids: Sequence[int],
                  chosen_labels: Sequence[int], rejected_labels: Sequence[int]) -> int:
    """Tokens the two sequences share from their start, up to the first scored (labelled) token
    of either: the prompt both responses are predicted from."""
    limit = min(first_label(chosen_labels), first_label(rejected_labels))
    shared = 0
    while shared < limit and chosen_ids[shared] == rejected_ids[shared]:
        shared += 1
    return shared


def first_label(labels: Sequence[int]) -> int:
    """The position of the first scored token (the sequence's length when none is)."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def sequences(row: dict) -> list[tuple[list[int], list[int]]]:
    """A tokenized row's `(ids, labels)` sequences: chosen, rejected, and a ranking's others."""
    return [(row["chosen_input_ids"], row["chosen_labels"]),
            (row["rejected_input_ids"], row["rejected_labels"]),
            *zip(row.get("more_input_ids", ()), row.get("more_labels", ()))]


def share_prompts(rows: Sequence[dict], pad_token_id: int, width_of, cap: float | None
                  ) -> dict[str, torch.Tensor]:
    """The batch of `PreferenceCollator(share_prompt=True)` for tokenized `rows`.

    Each pair is a segment `[prompt | chosen rest | rejected rest]` (a ranking of K responses
    `[prompt | rest 1 | ... | rest K]`, K the batch's most); with `cap` (packing) the
    segments are laid end to end in as few rows of at most `cap` tokens (`math.inf`: one row)
    as hold them (first fit, longest first; a segment longer than `cap`, which a pair of two
    long responses can be, gets a row of its own), else one per row; `width_of` rounds widths.
    Returns `input_ids`, `attention_mask` (1 on real tokens), `labels` (each response token's
    label at its place, −100 elsewhere) and `position_ids`, each (R, L), and `shared_pairs`
    (B, 3 + K): each pair's (row, start, prompt length, then each response's rest length: chosen,
    rejected, ...; 0 for a ranking's missing response).
    """
    responses = [sequences(row) for row in rows]
    slots = max(map(len, responses))
    segments = []
    for ranked in responses:
        (chosen, chosen_labels), others = ranked[0], ranked[1:]
        # With no common prompt (0) the segment is sequences side by side: the rule keeps them
        # apart and each first token goes unscored, as at the start of its own sequence.
        prompt = min(shared_prefix(chosen, ids, chosen_labels, labels) for ids, labels in others)
        rests = [len(ids) - prompt for ids, _ in ranked]
        segments.append((prompt, *rests, *[0] * (slots - len(ranked))))
    lengths = [sum(segment) for segment in segments]
    members: list[list[int]] = []
    fill: list[int] = []
    order = range(len(rows)) if cap is None else sorted(range(len(rows)), key=lambda i: -lengths[i])
    for i in order:
        fits = (r for r, used in enumerate(fill) if cap is not None and used + lengths[i] <= cap)
        row = next(fits, len(fill))
        if row == len(fill):
            members.append([])
            fill.append(0)
        members[row].append(i)
        fill[row] += lengths[i]
    width = width_of(max(fill))
    shape = (len(members), width)
    batch = {
        "input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "shared_pairs": torch.zeros((len(rows), 3 + slots), dtype=torch.long),
    }
    for r, indices in enumerate(members):
        start = 0
        for i in sorted(indices):
            prompt, *rests = segments[i]
            end = start + lengths[i]
            ranked = responses[i]
            ids = [*ranked[0][0], *(token for seq, _ in ranked[1:] for token in seq[prompt:])]
            batch["input_ids"][r, start:end] = torch.tensor(ids)
            at = start + prompt
            for (_, labels), rest in zip(ranked, rests):
                tail = torch.tensor(labels[prompt:], dtype=torch.long)
                batch["labels"][r, at:at + len(tail)] = tail
                at += rest
            batch["attention_mask"][r, start:end] = 1
            batch["position_ids"][r, start:end] = torch.cat(
                [torch.arange(prompt + rests[0])]
                + [torch.arange(prompt, prompt + rest) for rest in rests[1:]])
            batch["shared_pairs"][i] = torch.tensor([r, start, *segments[i]])
            start = end
        # Padding counts on from 0 as a sequence of its own, within the positions pairs use.
        batch["position_ids"][r, start:] = torch.arange(width - start) % max(lengths)
    return batch
