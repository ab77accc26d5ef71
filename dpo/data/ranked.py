"""Ranked rows: N ≥ 2 responses to one prompt, ordered best first.

Two layouts, one normalised form (`dpo.data.formats`, format ``ranked``):

- ``prompt``, ``responses`` (a list) and ``ranks`` (1 = best, a permutation of 1..N): a full
  ranking, whose order the loss reads in N − 1 Plackett–Luce stages;
- ``prompt``, ``chosen`` and ``rejected`` as a *list* of responses: the best response over an
  unordered list of others, one stage.

A normalised ranked row holds rank 1 in ``chosen``, rank 2 in ``rejected`` (so it flows through
the pair pipeline as a pair does), ranks 3..N best first in ``more``, and in ``stages`` how many
Plackett–Luce stages the data orders. Each response is a string or a list of messages.
"""
from __future__ import annotations

import pyarrow.compute as pc
from datasets import List, Value

from dpo.data.errors import RowProblem
from dpo.data.messages import MESSAGE, has_text, to_messages

RANKED_COLUMNS = {"more": List(List(MESSAGE)), "stages": Value("int32")}
# What a problem row holds in the ranked columns.
NO_RANKING = {"more": [], "stages": 0}


def ranked_responses(row: dict, prompt: str, first: str, second: str
                     ) -> tuple[list[dict], list[list[dict]], int]:
    """`(prompt messages, responses best first, stages)` of a source row: `first`, `second` are
    ``responses``/``ranks`` or ``chosen``/``rejected`` (a list). Raises RowProblem."""
    prompt_messages = to_messages(row[prompt], prompt, "user")
    if first == "responses":
        responses, ranks = row[first], row[second]
        for name, value in ((first, responses), (second, ranks)):
            if value is None:
                raise RowProblem("missing_field", f"{name} is missing")
            if not isinstance(value, list):
                raise RowProblem("malformed", f"{name} is a {type(value).__name__}, not a list")
        if len(responses) != len(ranks):
            raise RowProblem("malformed", f"{len(responses)} responses and {len(ranks)} ranks")
        _check_count(len(responses))
        check_ranks(ranks)
        order = sorted(range(len(ranks)), key=lambda i: ranks[i])
        fields = [f"responses[{i}]" for i in order]
        values = [responses[i] for i in order]
        stages = len(values) - 1
    else:
        rejected = row[second]
        if rejected is None:
            raise RowProblem("missing_field", f"{second} is missing")
        if not isinstance(rejected, list):
            raise RowProblem("malformed", f"{second} is a {type(rejected).__name__}, not a list")
        _check_count(1 + len(rejected))
        fields = [first, *(f"{second}[{i}]" for i in range(len(rejected)))]
        values = [row[first], *rejected]
        stages = 1
    messages = [_response(value, field) for value, field in zip(values, fields)]
    for i, response in enumerate(messages):
        for j in range(i):
            if messages[j] == response:
                raise RowProblem("identical", f"{fields[j]} and {fields[i]} are the same")
    return prompt_messages, messages, stages


def check_ranks(ranks: list) -> None:
    """RowProblem ``bad_ranks`` unless `ranks` are the integers 1..N, each once."""
    shown = f"ranks {ranks}"
    for rank in ranks:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise RowProblem("bad_ranks", f"{shown}: {rank!r} is not a whole number")
    seen = set()
    for rank in ranks:
        if rank in seen:
            raise RowProblem("bad_ranks", f"{shown}: {rank} is given twice")
        seen.add(rank)
    if min(ranks) < 1:
        raise RowProblem("bad_ranks", f"{shown}: ranks count from 1 (best), found {min(ranks)}")
    missing = min(set(range(1, len(ranks) + 1)) - seen, default=None)
    if missing is not None:
        raise RowProblem("bad_ranks", f"{shown} skip {missing}")


def _check_count(count: int) -> None:
    if count < 2:
        raise RowProblem("malformed", f"a ranking needs 2 or more responses, found {count}")


def _response(value, field: str) -> list[dict]:
    messages = to_messages(value, field, "assistant")
    check_response(messages, field)
    return messages


def check_response(messages: list[dict], field: str) -> None:
    """RowProblem ``empty`` for a response with no message or one without text."""
    if not messages:
        raise RowProblem("empty", f"{field} has no message")
    for i, message in enumerate(messages):
        if not has_text(message):
            raise RowProblem("empty", f"{field}[{i}] is empty")


def more_bodies(renderer, row: dict, prompt: str) -> list[str]:
    """The bodies of a normalised ranked row's responses 3..N (`renderer` a `PairRenderer`),
    each rendered after the same prompt text as its first two (``template_mismatch`` where the
    template renders the prompt otherwise)."""
    bodies = []
    for k, response in enumerate(row["more"]):
        text, body, _ = renderer.split_texts({**row, "chosen": response, "rejected": response})
        if text != prompt:
            raise RowProblem("template_mismatch", f"the prompt renders differently before "
                             f"response {3 + k} of the ranking")
        bodies.append(body)
    return bodies


def encode_more(pair_tokenizer, prompt: str, bodies: list[str]) -> list[list[int]]:
    """Each body's ids after the prompt's, ending with the turn's end token, as
    `dpo.data.tokenize._PairTokenizer` finds a pair's."""
    if not bodies:
        return []
    tokenizer = pair_tokenizer.tokenizer
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer([prompt + body for body in bodies], add_special_tokens=False)["input_ids"]
    return [pair_tokenizer.response_ids(prompt_ids, ids, body) for ids, body in zip(full, bodies)]


def is_ranked_feature(feature) -> bool:
    """Whether a `rejected` column holds a list of responses (strings, or lists of messages),
    not one response: List(string) or List(List(message))."""
    inner = getattr(feature, "feature", None)
    return isinstance(feature, List) and (
        isinstance(inner, List) or (isinstance(inner, Value) and inner.dtype in ("string",
                                                                              "large_string")))


def is_ranked(ds) -> bool:
    """Whether normalised or tokenized rows are rankings (they carry `stages`)."""
    return "stages" in ds.column_names


def check_response_count(ds, cap: int) -> None:
    """ValueError naming the normalised ranked row of more than `cap` responses that comes
    first in the source."""
    # List lengths from Arrow: the messages themselves are never turned into Python objects.
    counts = pc.list_value_length(ds.with_format("arrow")["more"]).to_pylist()
    over = [(row, 2 + count) for row, count in zip(ds["row_index"], counts) if 2 + count > cap]
    if over:
        row, count = min(over)
        raise ValueError(f"row {row} ranks {count} responses, over max_responses {cap} "
                         "(each response is one more sequence in the forward): raise "
                         "max_responses if memory allows, or drop responses")


def as_rankings(parts: list) -> list:
    """Tokenized datasets of a mixture, those of pairs as rankings of two (no `more` responses,
    one stage) when another is ranked, so that they concatenate; else as they are."""
    ranked = [part for part in parts if is_ranked(part)]
    if not ranked or len(ranked) == len(parts):
        return parts
    features = ranked[0].features
    out = []
    for part in parts:
        if not is_ranked(part):
            empty = [[]] * len(part)
            for name, values in (("more_input_ids", empty), ("more_labels", empty),
                                 ("stages", [1] * len(part))):
                part = part.add_column(name, values, feature=features[name])
        out.append(part)
    return out
