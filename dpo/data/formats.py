"""Preference-data formats: detect them from the columns and normalise them to one schema.

Every supported layout is turned into the same *normalised* rows, so that tokenization, validation
and the trainer never look at the source format again:

``prompt``
    list of ``{"role", "content", "fields"}`` messages (``dpo.data.messages``: ``fields`` holds
    tool calls, reasoning and any other key as JSON); empty when the data has no prompt.
``chosen`` / ``rejected``
    list of messages: the response(s) that follow the prompt, normally one assistant message.
``tools`` / ``chat_template_kwargs``
    the row's tool schemas and chat-template options as JSON text, ``""`` for none: every format
    may carry a ``tools`` and a ``chat_template_kwargs`` column.
``images``
    only for data with an ``images`` (or ``image``) column: see ``dpo.data.images``.
``row_index``
    the row's index in the source split, so that a bad row can be found in the original file.
``problem``
    ``""`` for a well-formed row, else ``"<reason>: <detail>"`` for a defect found while
    normalising (a missing value, a number where text belongs, ...). Such rows are kept here and
    skipped, counted by reason, when tokenizing: a bad row must never crash training later.

Supported formats (``DATA_FORMATS``):

``stack_exchange``
    ``question``, ``response_j`` (chosen), ``response_k`` (rejected): lvwerra/stack-exchange-paired.
``standard``
    ``prompt``, ``chosen``, ``rejected`` as strings.
``conversational``
    ``chosen``/``rejected`` as lists of ``{role, content}`` messages, with or without a ``prompt``
    column (a list of messages). Without one, the prompt is the messages both share, up to their
    last shared assistant turn.
``implicit_prompt``
    only ``chosen``/``rejected`` full ``\\n\\nHuman: ...\\n\\nAssistant: ...`` transcripts
    (Anthropic HH-RLHF): they are parsed into messages and split like ``conversational``, which puts
    the prompt at their common prefix up to the last ``\\n\\nAssistant:``.
``sharegpt``
    ``conversations``, ``chosen``, ``rejected`` as ``{from, value}`` messages (LLaMA-Factory).
``unpaired``
    ``prompt``, ``completion`` and a boolean ``label`` (true: desirable): KTO's feedback. Its
    normalised rows hold the completion as ``chosen`` and ``rejected`` (``dpo.data.unpaired``).
``ranked``
    ``prompt``, ``responses`` and ``ranks`` (1 = best), or ``prompt``, ``chosen`` and a list of
    ``rejected`` responses: rankings of N ≥ 2 responses (``dpo.data.ranked``).
``prompts``
    ``prompt`` alone: prompts for online DPO to answer (``dpo.online.prompts``). Their
    normalised rows have empty ``chosen`` and ``rejected``; ``train.py`` refuses them.

All of them go through one converter: only the column names differ, and a value may be a string
(one message with the field's default role), one message dict or a list of them, with
``role``/``content`` or ShareGPT's ``from``/``value`` keys. Messages with ``tool_calls``,
``reasoning_content`` or ``tool`` roles are conversational rows like any other.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value

from dpo.data import images
from dpo.data.errors import RowProblem
from dpo.data.messages import (MESSAGE, ROLES, as_json, has_text, kwargs_of, to_messages,
                               tools_of)
from dpo.data.ranked import NO_RANKING, RANKED_COLUMNS, is_ranked_feature, ranked_responses
from dpo.data.transcripts import parse_transcript, split_shared_prompt

DATA_FORMATS = ("stack_exchange", "standard", "conversational", "implicit_prompt", "sharegpt",
                "unpaired", "ranked", "prompts")
# Columns that hold responses: a dataset with a prompt and none of them holds prompts only.
RESPONSE_COLUMNS = ("chosen", "rejected", "completion", "responses")

# Why a row is skipped. Normalising can find the first three; tokenizing finds the rest.
DROP_REASONS = (
    "missing_field",  # a value (or a message's role/content) is missing
    "not_a_string",  # text is a number, a dict, ...
    "malformed",  # a message is not a dict, has an unknown role, or no prompt can be split off
    "empty",  # a message's text is empty or only whitespace, or a response (prompts only:
    #           the prompt) has no message
    "identical",  # chosen == rejected: the pair carries no preference
    "bad_ranks",  # a ranking's ranks have a tie or a gap
    "template_mismatch",  # the chat template renders the prompt differently once a response follows
    "template_error",  # the chat template raises on the conversation (Gemma: roles must alternate)
    "truncated_away",  # the prompt fills max_length: nothing of a response would remain
    "no_prompt_tokens",  # no prompt token, no BOS: the first response token cannot be scored
    "not_raw_text",  # --chat-template none, but a prompt or response is several messages
    "needs_chat_template",  # tools, tool calls or reasoning, and no chat template to render them
    "unrendered_tool_calls",  # the chat template does not write an assistant's tool calls
    *images.DROP_REASONS,
)

NORMALISED_FEATURES = Features({"prompt": List(MESSAGE), "chosen": List(MESSAGE),
                                "rejected": List(MESSAGE), "tools": Value("string"),
                                "chat_template_kwargs": Value("string"),
                                "row_index": Value("int64"), "problem": Value("string")})
UNPAIRED_FEATURES = Features({**NORMALISED_FEATURES, "label": Value("bool")})
RANKED_FEATURES = Features({**NORMALISED_FEATURES, **RANKED_COLUMNS})


@dataclass(frozen=True)
class FormatSpec:
    """Where a format keeps its prompt, chosen and rejected values (``None``: it has none)."""

    name: str
    prompt: str | None
    chosen: str | None  # None: prompts only
    rejected: str | None  # None: unpaired rows (a completion and its label), or prompts only
    images: str | None = None  # the column of a vision row's images (dpo.data.images)


def _is_text(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def resolve_format(features: Features, data_format: str | None = None) -> FormatSpec:
    """Pick the format from the columns (``data_format=None``) or check the requested one fits.

    Raises ``ValueError`` naming the columns found and the formats expected when no format fits.
    """
    columns = set(features)
    candidates = {
        "stack_exchange": FormatSpec("stack_exchange", "question", "response_j", "response_k"),
        "sharegpt": FormatSpec("sharegpt", "conversations", "chosen", "rejected"),
        "standard": FormatSpec("standard", "prompt", "chosen", "rejected"),
        # Conversational data may carry its prompt inside chosen/rejected, and HH-RLHF always does.
        "conversational": FormatSpec(
            "conversational", "prompt" if "prompt" in columns else None, "chosen", "rejected"
        ),
        "implicit_prompt": FormatSpec("implicit_prompt", None, "chosen", "rejected"),
        "unpaired": FormatSpec("unpaired", "prompt", "completion", None),
        "ranked": FormatSpec("ranked", "prompt", *(("responses", "ranks") if "ranks" in columns
                                                   else ("chosen", "rejected"))),
        "prompts": FormatSpec("prompts", "prompt", None, None),
    }
    if data_format is None:
        data_format = _detect(features)
    if data_format not in candidates:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {DATA_FORMATS}")
    spec = candidates[data_format]
    needed = [c for c in (spec.prompt, spec.chosen, spec.rejected) if c is not None]
    needed += ["label"] if spec.name == "unpaired" else []
    if not set(needed) <= columns:
        raise ValueError(
            f"data format {data_format!r} needs columns {needed}, found {sorted(columns)}"
        )
    spec = replace(spec, images=images.vision_column(spec.name, features))
    if spec.name == "unpaired" and features["label"] != Value("bool"):
        raise ValueError(f"label must hold booleans (true: a desirable completion), found "
                         f"{getattr(features['label'], 'dtype', features['label'])}")
    return spec


def _detect(features: Features) -> str:
    columns = set(features)
    if {"question", "response_j", "response_k"} <= columns:
        return "stack_exchange"
    if {"conversations", "chosen", "rejected"} <= columns:
        return "sharegpt"
    if {"prompt", "completion", "label"} <= columns:
        return "unpaired"
    if {"prompt", "responses", "ranks"} <= columns:
        return "ranked"
    if {"prompt", "chosen", "rejected"} <= columns and is_ranked_feature(features["rejected"]):
        return "ranked"
    if {"chosen", "rejected"} <= columns:
        texts = _is_text(features["chosen"]) and _is_text(features["rejected"])
        if "prompt" in columns:
            return "standard" if texts and _is_text(features["prompt"]) else "conversational"
        return "implicit_prompt" if texts else "conversational"
    if "prompt" in columns and not columns & set(RESPONSE_COLUMNS):
        return "prompts"
    raise ValueError(
        f"cannot tell the preference format from the columns {sorted(columns)}; expected "
        "question/response_j/response_k (stack_exchange), prompt/chosen/rejected (standard or "
        "conversational), chosen/rejected (implicit_prompt or conversational) or "
        "conversations/chosen/rejected (sharegpt), prompt/completion/label (unpaired) or "
        "prompt/responses/ranks (ranked) or prompt alone (prompts)"
    )


def normalise_row(row: dict, spec: FormatSpec) -> dict:
    """Convert one source row to the normalised messages; defects go to ``problem``."""
    ranking, pictures = {}, []
    try:
        if spec.name == "ranked":
            prompt, responses, stages = ranked_responses(row, spec.prompt, spec.chosen,
                                                         spec.rejected)
            chosen, rejected = responses[:2]
            ranking = {"more": responses[2:], "stages": stages}
        elif spec.name == "prompts":
            prompt, chosen, rejected = to_messages(row[spec.prompt], spec.prompt, "user"), [], []
            problem = find_problem(prompt, chosen, rejected, prompt_only=True)
            if problem:
                raise problem
        elif spec.name == "unpaired":
            prompt = to_messages(row[spec.prompt], spec.prompt, "user")
            chosen = rejected = to_messages(row[spec.chosen], spec.chosen, "assistant")
            if row["label"] is None:
                raise RowProblem("missing_field", "label is missing")
        elif spec.prompt is not None:
            prompt = to_messages(row[spec.prompt], spec.prompt, "user")
            chosen = to_messages(row[spec.chosen], spec.chosen, "assistant")
            rejected = to_messages(row[spec.rejected], spec.rejected, "assistant")
            # Some datasets (UltraFeedback) repeat the prompt at the start of both responses.
            n = len(prompt)
            if n and chosen[:n] == rejected[:n] == prompt and len(chosen) > n < len(rejected):
                chosen, rejected = chosen[n:], rejected[n:]
        else:
            chosen, rejected = (
                parse_transcript(value, field) if isinstance(value, str)
                else to_messages(value, field, "assistant")
                for field, value in ((spec.chosen, row[spec.chosen]),
                                     (spec.rejected, row[spec.rejected]))
            )
            prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
        # A row's own tools and template options; the columns are optional in every format.
        tools = as_json(tools_of(row.get("tools")))
        kwargs = as_json(kwargs_of(row.get("chat_template_kwargs")))
        if spec.images:
            prompt, pictures = images.attach_images(row, spec, prompt, chosen, rejected)
    except RowProblem as problem:
        normalised = {"prompt": [], "chosen": [], "rejected": [], "tools": "",
                      "chat_template_kwargs": "", "problem": str(problem)}
    else:
        normalised = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools,
                      "chat_template_kwargs": kwargs, "problem": ""}
    normalised |= {"images": pictures} if spec.images else {}
    if spec.name == "ranked":
        return {**normalised, **NO_RANKING, **ranking}
    return normalised if spec.name != "unpaired" else {**normalised, "label": bool(row["label"])}


def normalise(ds: Dataset, *, data_format: str | None = None,
              row_indices: list[int] | None = None, num_proc: int | None = None) -> Dataset:
    """Normalise a raw preference dataset (see the module docstring) with ``Dataset.map``.

    ``row_indices`` are the rows' indices in the source split (default: their positions in
    ``ds``); they end up in the ``row_index`` column for error messages.
    """
    spec = resolve_format(ds.features, data_format)
    features = {"ranked": RANKED_FEATURES, "unpaired": UNPAIRED_FEATURES}.get(
        spec.name, NORMALISED_FEATURES)
    if spec.images:  # undecoded: the images' bytes reach the rows as they are
        features, ds = Features({**features, "images": List(images.IMAGE)}), images.undecoded(ds)
    if row_indices is None:
        row_indices = list(range(len(ds)))
    if len(row_indices) != len(ds):
        raise ValueError(f"row_indices has {len(row_indices)} entries for {len(ds)} rows")

    if len(ds) == 0:  # map skips an empty dataset and would keep its columns
        return Dataset.from_dict({name: [] for name in features}, features=features)

    def convert(row: dict, position: int) -> dict:
        return {**normalise_row(row, spec), "row_index": row_indices[position]}

    return ds.map(
        convert,
        with_indices=True,
        remove_columns=ds.column_names,
        features=features,
        num_proc=num_proc,
        desc=f"normalising {spec.name} rows",
    )


def find_problem(prompt: list[dict], chosen: list[dict], rejected: list[dict],
                 paired: bool = True, prompt_only: bool = False) -> RowProblem | None:
    """Check a normalised row's content; return the first problem, or ``None`` for a good row.

    Runs on every row before tokenizing, also on datasets that were built by hand in the
    normalised schema, so it re-checks what the converter guarantees for loaded data.
    ``prompt_only``: a row of the ``prompts`` format, whose prompt is all there is to check.
    """
    if prompt_only and not prompt:
        return RowProblem("empty", "prompt has no message")
    for field, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if field != "prompt" and not messages and not prompt_only:
            return RowProblem("empty", f"{field} has no message")
        for i, message in enumerate(messages):
            where = f"{field}[{i}]"
            if message["role"] not in ROLES:
                return RowProblem("malformed", f"{where} has unknown role {message['role']!r}")
            if message["content"] is None:
                return RowProblem("missing_field", f"{where} has no content")
            if not has_text(message):
                return RowProblem("empty", f"{where} is empty")
    if paired and not prompt_only and chosen == rejected:
        return RowProblem("identical", "chosen and rejected are the same")
    return None


def holds_prompts_only(rows: Dataset) -> bool:
    """Whether normalised rows are prompts without responses (the ``prompts`` format): no row
    has a chosen or rejected message, and some row is well-formed."""
    if not len(rows):
        return False
    table = rows.with_format("arrow")[:]
    responses = pc.add(pc.list_value_length(table["chosen"]),
                       pc.list_value_length(table["rejected"]))
    return pc.max(responses).as_py() == 0 and pc.any(pc.equal(table["problem"], "")).as_py()
