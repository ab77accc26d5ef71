"""Preference data for DPO: load, hold out, tokenize, validate, batch.

The pipeline, in the order the trainer calls it:

1. ``load_preference_splits`` loads a hub dataset or a local file/folder with
   ``datasets.load_dataset``, draws ``num_samples`` rows with a seeded shuffle, holds out eval rows
   (or takes them from the dataset's own test split) and normalises every row to messages
   (``dpo.formats``: columns ``prompt``, ``chosen``, ``rejected``, ``row_index``, ``problem``).
2. ``prepare_tokenizer`` gives a tokenizer without a pad token its EOS as pad token.
3. ``tokenize_preferences`` renders each pair (chat template or plain text), tokenizes, truncates
   and validates it with ``Dataset.map``, skips bad rows and counts them in a ``FilterReport``.
4. ``LengthGroupedBatchSampler`` groups pairs of similar length into micro-batches, and
   ``PreferenceCollator`` pads them into one ``[chosen; rejected]`` batch.

Tokenized rows have the columns ``chosen_input_ids``/``rejected_input_ids`` (prompt + response),
``chosen_labels``/``rejected_labels`` (the same ids with -100 on the prompt), ``length`` (the
longer of the two sequences, for length grouping) and ``row_index`` (the row in the source split).
``dpo.reference_cache`` may add ``ref_chosen_logps``/``ref_rejected_logps``, the reference's
precomputed summed log-probs.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset
from datasets.fingerprint import Hasher
from jinja2 import TemplateError

from dpo import formats
from dpo.formats import (
    DATA_FORMATS,
    DROP_REASONS,
    RowProblem,
    find_problem,
    normalise,
    resolve_format,
)

__all__ = [
    "DATA_FORMATS",
    "DROP_REASONS",
    "IGNORE_INDEX",
    "FilterReport",
    "LengthGroupedBatchSampler",
    "PreferenceCollator",
    "REF_LOGPS_COLUMNS",
    "default_eval_samples",
    "load_preference_splits",
    "padding_fraction",
    "prepare_tokenizer",
    "tokenize_preferences",
]

IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there
# Float columns of precomputed reference log-probs (dpo.reference_cache), passed on by the collator.
REF_LOGPS_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")

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

# Plain-text rendering (no chat template): HH-RLHF's "\n\nHuman: ...\n\nAssistant: ..." layout.
PLAIN_LABELS = {"system": "System", "user": "Human", "assistant": "Assistant", "tool": "Tool"}
# Stands in for a response's content to find where the chat template puts the content.
CONTENT_SENTINEL = "\x00DPO-RESPONSE-CONTENT\x00"
# The conversation that shows which token the chat template ends an assistant turn with.
END_OF_TURN_PROBE = [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": CONTENT_SENTINEL}]
# Reasons whose detail the report prints: the row indices alone do not say what went wrong.
REPORTED_DETAILS = ("template_error",)
# The columns of a row that is skipped: it is dropped after the report is made.
UNUSABLE_PAIR = {
    "chosen_input_ids": [],
    "chosen_labels": [],
    "rejected_input_ids": [],
    "rejected_labels": [],
    "length": 0,
    "truncated": False,
}


# --------------------------------------------------------------------------------------------
# Loading and splitting
# --------------------------------------------------------------------------------------------


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

    The rows come out in the schema of ``dpo.formats`` (``prompt``/``chosen``/``rejected``
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


# --------------------------------------------------------------------------------------------
# Tokenization, truncation and validation
# --------------------------------------------------------------------------------------------


def prepare_tokenizer(tokenizer):
    """Make ``tokenizer`` ready for DPO and return it.

    A tokenizer without a pad token gets its EOS as pad token: padding never reaches the loss
    (labels are -100 and the attention mask is 0 there), so the id only has to be valid.
    """
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; DPO needs one to end each response")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class FilterReport:
    """What ``tokenize_preferences`` kept, truncated and dropped (by reason, with example rows)."""

    total: int
    kept: int
    truncated: int
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)  # first row indices per reason
    # The first distinct details per reason (for template_error, the template's own message).
    details: dict[str, list[str]] = field(default_factory=dict)

    MAX_EXAMPLES = 5

    @classmethod
    def from_rows(
        cls, problems: Sequence[str], row_indices: Sequence[int], truncated: Sequence[bool]
    ) -> FilterReport:
        """Count the rows' problems (``""`` for a kept row); examples are the lowest rows."""
        report = cls(total=len(problems), kept=0, truncated=sum(truncated))
        for problem, row in sorted(zip(problems, row_indices), key=lambda pr: pr[1]):
            if not problem:
                report.kept += 1
                continue
            reason, _, detail = problem.partition(":")
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            examples = report.examples.setdefault(reason, [])
            if len(examples) < cls.MAX_EXAMPLES:
                examples.append(row)
            details = report.details.setdefault(reason, [])
            if len(details) < cls.MAX_EXAMPLES and detail.strip() not in details:
                details.append(detail.strip())
        order = {reason: i for i, reason in enumerate(DROP_REASONS)}
        report.dropped = dict(sorted(report.dropped.items(), key=lambda kv: order[kv[0]]))
        return report

    def __str__(self) -> str:
        line = f"kept {self.kept} of {self.total} pairs ({self.truncated} truncated)"
        if not self.dropped:
            return line + ", dropped none"
        reasons = []
        for reason, count in self.dropped.items():
            rows = ", ".join(str(row) for row in self.examples[reason])
            more = ", ..." if count > len(self.examples[reason]) else ""
            if reason in REPORTED_DETAILS:
                more += "".join(f'; "{detail}"' for detail in self.details[reason])
            reasons.append(f"{reason} {count} (rows {rows}{more})")
        return f"{line}, dropped {self.total - self.kept}: " + "; ".join(reasons)


class _PairTokenizer:
    """``Dataset.map`` function (batched) that turns normalised rows into token ids.

    For each row it renders the prompt and both prompt+response conversations, finds the prompt
    text both conversations start with, tokenizes, truncates and labels. A row that cannot be used
    gets a ``problem`` (``"<reason>: <detail>"``) and empty ids instead of an exception; so does
    a row whose conversation the chat template refuses (``template_error``: Gemma's raises unless
    roles alternate user/assistant).

    Each response ends with one terminator: the special token the chat template ends an
    assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), which need not be
    the tokenizer's EOS (a base checkpoint's ``<eos>``/``<|end_of_text|>``). Without a chat
    template, or with one that writes no special token right after the content, it is the EOS.
    """

    def __init__(self, tokenizer, *, max_length, max_prompt_length, use_chat_template):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.use_chat_template = use_chat_template
        self.end_text, self.end_id = tokenizer.eos_token, tokenizer.eos_token_id
        if use_chat_template:
            self.end_text, self.end_id = self.end_of_turn()
        # Only a tokenizer that adds BOS itself (Llama) wants one; we add it at most once below.
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.bos_id = bos if adds_bos else None

    def end_of_turn(self) -> tuple[str, int]:
        """(text, id) of the special token the chat template writes right after an assistant's
        content (whitespace aside); the EOS when it writes none there."""
        try:
            rendered = self.render(END_OF_TURN_PROBE)
        except TemplateError as e:
            raise ValueError(f"the chat template cannot render a user turn and an assistant "
                             f"reply: {_one_line(e)}") from None
        if CONTENT_SENTINEL in rendered:
            tail = rendered.split(CONTENT_SENTINEL, 1)[1].lstrip()
            ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
            token = self.tokenizer.added_tokens_decoder.get(ids[0]) if ids else None
            if token is not None and token.special and tail.startswith(token.content):
                return token.content, ids[0]
        return self.tokenizer.eos_token, self.tokenizer.eos_token_id

    # -- rendering ---------------------------------------------------------------------------

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """The conversation as text: the chat template's, or HH-style plain text."""
        if self.use_chat_template:
            if not messages:  # templates refuse an empty conversation; it renders as nothing
                return ""
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        text = "".join(f"\n\n{PLAIN_LABELS[m['role']]}: {m['content']}" for m in messages)
        return text + "\n\nAssistant:" if add_generation_prompt else text

    def prompt_candidates(self, prompt: list[dict]):
        """Texts that may open every prompt+response rendering, the most specific first.

        A chat template may write more than the generation prompt before an assistant's content
        (Qwen3 puts ``<think>\\n\\n</think>\\n\\n`` into the last assistant turn): rendering a
        sentinel response shows all of it, and it belongs to the prompt, so that the labels
        cover the response's content and not the template's scaffolding. When the template
        renders the real content differently (a response with its own ``<think>`` block, a
        multi-turn response), the generation prompt is the fallback.
        """
        if self.use_chat_template:
            sentinel = [*prompt, {"role": "assistant", "content": CONTENT_SENTINEL}]
            rendered = self.render(sentinel)
            if CONTENT_SENTINEL in rendered:
                yield rendered[: rendered.index(CONTENT_SENTINEL)]
        if prompt or not self.use_chat_template:
            yield self.render(prompt, add_generation_prompt=True)

    def split_texts(self, row: dict) -> tuple[str, str, str]:
        """(prompt text, chosen body, rejected body); the bodies end before the turn's end."""
        try:
            chosen = self.render([*row["prompt"], *row["chosen"]])
            rejected = self.render([*row["prompt"], *row["rejected"]])
            candidates = list(self.prompt_candidates(row["prompt"]))
        except TemplateError as e:  # raised by the template itself (raise_exception)
            raise RowProblem("template_error", _one_line(e)) from None
        for prompt in candidates:
            if chosen.startswith(prompt) and rejected.startswith(prompt):
                return prompt, self._body(chosen[len(prompt):]), self._body(rejected[len(prompt):])
        raise RowProblem("template_mismatch", "no rendering of the prompt opens both conversations")

    def _body(self, response: str) -> str:
        # What a template writes after the turn's end token (Qwen3: "\n") is never generated,
        # and the token is added back as one id, so the body ends where the response's text ends.
        response = response.rstrip()
        return response.removesuffix(self.end_text)

    # -- tokenizing --------------------------------------------------------------------------

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        # Loaded rows carry the problems found while normalising; hand-made ones may not.
        problems = [row.get("problem") or self.check_content(row) for row in rows]
        texts = {}
        for i, row in enumerate(rows):
            if not problems[i]:
                try:
                    texts[i] = self.split_texts(row)
                except RowProblem as problem:
                    problems[i] = str(problem)
        encoded = self.encode_rows(texts)

        out = {name: [] for name in [*UNUSABLE_PAIR, "problem"]}
        for i, problem in enumerate(problems):
            pair = UNUSABLE_PAIR
            if not problem:
                try:
                    pair = self.truncate_and_label(*encoded[i])
                except RowProblem as skip:
                    problem = str(skip)
            for name, value in pair.items():
                out[name].append(value)
            out["problem"].append(problem)
        return out

    @staticmethod
    def check_content(row: dict) -> str:
        problem = find_problem(row["prompt"], row["chosen"], row["rejected"])
        return "" if problem is None else str(problem)

    def encode_rows(self, texts: dict[int, tuple[str, str, str]]) -> dict[int, tuple]:
        """Token ids of (prompt, chosen response + end, rejected response + end) per row."""
        if not texts:
            return {}
        strings = []
        for prompt, chosen, rejected in texts.values():
            strings += [prompt, prompt + chosen, prompt + rejected]
        ids = self.tokenizer(strings, add_special_tokens=False)["input_ids"]
        encoded = {}
        for k, (i, (_, chosen, rejected)) in enumerate(texts.items()):
            prompt_ids, chosen_ids, rejected_ids = ids[3 * k: 3 * k + 3]
            encoded[i] = (
                self.with_bos(prompt_ids),
                self.response_ids(prompt_ids, chosen_ids, chosen),
                self.response_ids(prompt_ids, rejected_ids, rejected),
            )
        return encoded

    def response_ids(self, prompt_ids: list[int], full_ids: list[int], body: str) -> list[int]:
        """The response's ids after ``prompt_ids``, ending with the turn's end token, once.

        The whole conversation is tokenized as one text, so the response's ids are the ones the
        model sees at its boundary with the prompt. Where a BPE merge crosses that boundary the
        prompt's ids are no prefix of the whole; then the response is tokenized on its own, which
        keeps the prompt's ids exactly as they are at generation time.
        """
        if full_ids[: len(prompt_ids)] == prompt_ids:
            ids = full_ids[len(prompt_ids):]
        else:
            ids = self.tokenizer(body, add_special_tokens=False)["input_ids"]
        return [*ids, self.end_id]

    def with_bos(self, prompt_ids: list[int]) -> list[int]:
        # Templates that write BOS themselves (Llama 3) already have it: never a second one.
        if self.bos_id is None or prompt_ids[:1] == [self.bos_id]:
            return prompt_ids
        return [self.bos_id, *prompt_ids]

    def truncate_and_label(self, prompt: list[int], chosen: list[int], rejected: list[int]):
        """Fit the pair into ``max_length`` and build ids and labels.

        Only a pair that does not fit is truncated: the prompt keeps its end (the last turns, and
        a leading BOS) up to ``max_prompt_length`` tokens, then each response keeps its start up
        to ``max_length`` minus the prompt's tokens, end token included: a cut response loses
        its end token, since it must not teach the model to stop mid-sentence.
        """
        truncated = len(prompt) + max(len(chosen), len(rejected)) > self.max_length
        if truncated:
            if len(prompt) > self.max_prompt_length:
                keep_bos = self.bos_id is not None and prompt[:1] == [self.bos_id]
                tail = prompt[len(prompt) - self.max_prompt_length + keep_bos:]
                prompt = [self.bos_id, *tail] if keep_bos else tail
            budget = self.max_length - len(prompt)
            if budget <= 0:
                raise RowProblem(
                    "truncated_away",
                    f"the prompt's {len(prompt)} tokens leave no room in max_length "
                    f"{self.max_length}",
                )
            chosen, rejected = chosen[:budget], rejected[:budget]
        masked = [IGNORE_INDEX] * len(prompt)
        return {
            "chosen_input_ids": prompt + chosen,
            "chosen_labels": masked + chosen,
            "rejected_input_ids": prompt + rejected,
            "rejected_labels": masked + rejected,
            "length": len(prompt) + max(len(chosen), len(rejected)),
            "truncated": truncated,
        }


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _fingerprint(ds: Dataset, pair_tokenizer: _PairTokenizer) -> str | None:
    """The cache key of a tokenization: what ``datasets`` would compute, but fast.

    By default ``Dataset.map`` pickles the function with its tokenizer to hash it, which takes
    seconds for a 150k-token vocabulary, on every call. The tokenizer's serialised form, the
    settings and this code determine the result just as well. ``None`` (let datasets hash) for
    a slow tokenizer, which has no serialised form.
    """
    tokenizer = pair_tokenizer.tokenizer
    if not tokenizer.is_fast:
        return None
    return Hasher.hash([
        ds._fingerprint,
        tokenizer.backend_tokenizer.to_str(),
        tokenizer.chat_template,
        tokenizer.eos_token,
        pair_tokenizer.end_id,
        pair_tokenizer.bos_id,
        pair_tokenizer.max_length,
        pair_tokenizer.max_prompt_length,
        pair_tokenizer.use_chat_template,
        *(Path(module.__file__).read_text() for module in (sys.modules[__name__], formats)),
    ])


def tokenize_preferences(
    ds: Dataset,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    use_chat_template: bool = True,
    strict: bool = False,
    num_proc: int | None = None,
) -> tuple[Dataset, FilterReport]:
    """Tokenize normalised preference rows; skip (or, ``strict``, refuse) bad ones.

    ``ds`` has the columns of ``dpo.formats`` (``row_index`` and ``problem`` are optional, so a
    hand-made dataset of ``prompt``/``chosen``/``rejected`` messages works too). Each pair is
    rendered with the tokenizer's chat template when it has one and ``use_chat_template`` is
    set, else as HH-style plain text (``\\n\\nHuman: ...\\n\\nAssistant: ...``). Every response ends
    with one terminator: the token the chat template ends an assistant turn with, else EOS (see
    ``_PairTokenizer``); the prompt gets the tokenizer's BOS when the tokenizer adds one itself,
    never twice. A row the chat template refuses is skipped as ``template_error``.
    ``max_prompt_length`` defaults to ``max_length // 2``; see
    ``_PairTokenizer.truncate_and_label`` for the truncation rules.

    Returns the tokenized rows (see the module docstring for the columns) and a ``FilterReport``.
    Raises ``ValueError`` when no row is left, and in ``strict`` mode for the first bad row.
    """
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if not 0 < max_prompt_length <= max_length:
        raise ValueError(
            f"need 0 < max_prompt_length <= max_length, got {max_prompt_length} and {max_length}"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; DPO needs one to end each response")
    if "row_index" not in ds.column_names:
        ds = ds.add_column("row_index", list(range(len(ds))))

    pair_tokenizer = _PairTokenizer(
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        use_chat_template=use_chat_template and tokenizer.chat_template is not None,
    )
    tokenized = ds.map(
        pair_tokenizer,
        batched=True,
        batch_size=256,
        remove_columns=[name for name in ds.column_names if name != "row_index"],
        num_proc=num_proc,
        new_fingerprint=_fingerprint(ds, pair_tokenizer),
        desc="tokenizing preference pairs",
    )
    problems, row_indices = list(tokenized["problem"]), list(tokenized["row_index"])
    report = FilterReport.from_rows(problems, row_indices, list(tokenized["truncated"]))
    if strict and report.kept < report.total:
        # The bad row that comes first in the source, where the user will look for it.
        row, problem = min((row, problem) for row, problem in zip(row_indices, problems) if problem)
        raise ValueError(f"row {row}: {problem} (strict mode)")
    if report.kept == 0:
        raise ValueError(f"no usable preference pairs are left: {report}")
    kept = [i for i, problem in enumerate(problems) if not problem]
    return tokenized.select(kept).remove_columns(["problem", "truncated"]), report


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


class PreferenceCollator:
    """Pad tokenized pairs into one right-padded ``[chosen; rejected]`` batch.

    For B rows it returns ``torch.long`` tensors of shape (2B, T): rows ``0..B-1`` are the chosen
    sequences, rows ``B..2B-1`` the rejected ones, row ``i`` and row ``B + i`` the same pair.
    ``labels`` are -100 on prompt and padding; ``attention_mask`` is 1 on real tokens. T is the
    longest sequence, rounded up to ``pad_to_multiple_of`` when given. Rows with precomputed
    reference log-probs (``REF_LOGPS_COLUMNS``) add them as ``(B,)`` float32 tensors of the same
    names, in pair order.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: call prepare_tokenizer(tokenizer) first")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        # All chosen sequences first, then all rejected ones: row i and row B + i are one pair.
        ids = [row[f"{side}_input_ids"] for side in ("chosen", "rejected") for row in rows]
        labels = [row[f"{side}_labels"] for side in ("chosen", "rejected") for row in rows]
        width = max(len(sequence) for sequence in ids)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(ids), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
            "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long),
        }
        for i, (sequence, label) in enumerate(zip(ids, labels)):
            batch["input_ids"][i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            batch["attention_mask"][i, : len(sequence)] = 1
            batch["labels"][i, : len(label)] = torch.tensor(label, dtype=torch.long)
        for name in REF_LOGPS_COLUMNS:
            if name in rows[0]:
                batch[name] = torch.tensor([row[name] for row in rows], dtype=torch.float32)
        return batch


def padding_fraction(batch: Mapping[str, torch.Tensor]) -> float:
    """Share of the batch's positions that are padding (from its attention mask)."""
    mask = batch["attention_mask"]
    return 1.0 - mask.sum().item() / mask.numel() if mask.numel() else 0.0


class LengthGroupedBatchSampler:
    """Batch sampler yielding micro-batches of pairs of similar length, global batch by global.

    Each epoch the pairs are shuffled with a generator seeded by ``(seed, epoch)``. With
    ``group_by_length`` the shuffled order is cut into mega-batches of ``mega_batch_mult`` global
    batches, each mega-batch is sorted by length (longest first) and cut into global batches, and
    the global batches are shuffled, so that each one holds pairs of similar length and padding
    shrinks while the data stays random at the scale of a few global batches.

    Which pairs form each global batch (and in which order) depends only on the seed, the epoch,
    ``global_batch_size`` and the lengths, never on ``micro_batch_size`` or the number of
    processes: an optimizer step sees the same pairs however the run is laid out, and resuming at
    micro-batch k of an epoch replays it exactly. Each global batch is emitted as consecutive
    micro-batches (accelerate deals micro-batch k to process k % num_processes).

    Tail: when the pairs do not fill the last global batch, it is topped up with the first pairs
    of the epoch's shuffled order. Every pair is seen each epoch, every optimizer step has
    ``global_batch_size`` pairs and every process the same number of micro-batches; the price
    is that up to ``global_batch_size - 1`` pairs are seen twice in that epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        group_by_length: bool = True,
        mega_batch_mult: int = 8,
    ):
        if len(lengths) == 0:
            raise ValueError("lengths is empty: there are no pairs to sample")
        if micro_batch_size < 1 or global_batch_size % micro_batch_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of "
                f"micro_batch_size {micro_batch_size}"
            )
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult must be >= 1, got {mega_batch_mult}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        self.epoch = epoch

    @property
    def num_global_batches(self) -> int:
        return math.ceil(len(self.lengths) / self.global_batch_size)

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return self.num_global_batches * (self.global_batch_size // self.micro_batch_size)

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches, each a list of ``global_batch_size`` pair indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        size = self.global_batch_size
        # np.resize repeats the order from its start: that tops up the last global batch.
        order = np.resize(rng.permutation(len(self.lengths)), self.num_global_batches * size)
        if self.group_by_length:
            mega = size * self.mega_batch_mult
            order = np.concatenate([
                chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                for chunk in np.split(order, range(mega, len(order), mega))
            ])
        batches = order.reshape(-1, size)
        # Without this, the longest batch would open every mega-batch.
        return batches[rng.permutation(len(batches))].tolist()

    def __iter__(self):
        for batch in self.global_batches():
            for start in range(0, self.global_batch_size, self.micro_batch_size):
                yield batch[start: start + self.micro_batch_size]
