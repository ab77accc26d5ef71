"""Tokenizing normalised preference rows: rendering (chat template, plain text or raw text), exact
token boundaries, truncation, labels, and validation with a report of the rows skipped."""
from __future__ import annotations

import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from datasets.fingerprint import Hasher
from jinja2 import TemplateError

from dpo.data import formats
from dpo.data.formats import DROP_REASONS, RowProblem, find_problem

IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there

# How a pair becomes text (``--chat-template``): the tokenizer's chat template ("auto", plain
# text for a tokenizer without one), HH-style plain text, or the fields' strings as they are.
CHAT_TEMPLATE_MODES = ("auto", "none", "plain")

# Plain-text rendering (no chat template): HH-RLHF's "\n\nHuman: ...\n\nAssistant: ..." layout.
PLAIN_LABELS = {"system": "System", "user": "Human", "assistant": "Assistant", "tool": "Tool"}
# Stands in for a response's content to find where the chat template puts the content.
CONTENT_SENTINEL = "\x00DPO-RESPONSE-CONTENT\x00"
# The conversation that shows which token the chat template ends an assistant turn with.
END_OF_TURN_PROBE = [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": CONTENT_SENTINEL}]
# Reasons whose detail the report prints: the row indices alone do not say what went wrong.
REPORTED_DETAILS = ("template_error", "not_raw_text")
# The columns of a row that is skipped: it is dropped after the report is made.
UNUSABLE_PAIR = {
    "chosen_input_ids": [],
    "chosen_labels": [],
    "rejected_input_ids": [],
    "rejected_labels": [],
    "length": 0,
    "truncated": False,
}


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


class NoPairsLeft(ValueError):
    """Every row was dropped; ``report`` says why, so a caller can name the rows' set."""

    def __init__(self, report: FilterReport):
        super().__init__(f"no usable preference pairs are left: {report}")
        self.report = report


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

    ``mode`` is ``"auto"`` (the chat template; the caller passes ``"plain"`` for a tokenizer
    without one), ``"plain"`` or ``"none"``: raw text, see ``raw_texts``.
    """

    def __init__(self, tokenizer, *, max_length, max_prompt_length, mode, prompt_template=None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.mode = mode
        self.prompt_template = prompt_template
        self.use_chat_template = mode == "auto"
        self.end_text, self.end_id = tokenizer.eos_token, tokenizer.eos_token_id
        if self.use_chat_template:
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
        """The conversation as text: the chat template's, or HH-style plain text, where a
        content that starts with its own space (HH-derived strings: ``" Sure, ..."``) gets no
        second one after the label."""
        if self.use_chat_template:
            if not messages:  # templates refuse an empty conversation; it renders as nothing
                return ""
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        text = "".join(f"\n\n{PLAIN_LABELS[m['role']]}:{_spaced(m['content'])}" for m in messages)
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
        if self.mode == "none":
            return self.raw_texts(row)
        prompt = unwrap_transcript(row["prompt"])
        try:
            chosen = self.render([*prompt, *row["chosen"]])
            rejected = self.render([*prompt, *row["rejected"]])
            candidates = list(self.prompt_candidates(prompt))
        except TemplateError as e:  # raised by the template itself (raise_exception)
            raise RowProblem("template_error", _one_line(e)) from None
        for prompt in candidates:
            if chosen.startswith(prompt) and rejected.startswith(prompt):
                return prompt, self._body(chosen[len(prompt):]), self._body(rejected[len(prompt):])
        raise RowProblem("template_mismatch", "no rendering of the prompt opens both conversations")

    def raw_texts(self, row: dict) -> tuple[str, str, str]:
        """``--chat-template none``: the prompt's text (through ``prompt_template``) and each
        response's text, as they are; the EOS follows as one id (TRL's standard format, and what a
        base model saw in pretraining). A string field is one message whose content is the string
        itself, so the texts are the source's strings. Messages cannot be joined without choosing
        a layout, which is what ``auto``/``plain`` are for: a row with more than one message in
        its prompt or a response is ``not_raw_text``.
        """
        for name in ("prompt", "chosen", "rejected"):
            if len(row[name]) > 1:
                raise RowProblem("not_raw_text", "--chat-template none takes one text per field, "
                                 "not a conversation; use auto or plain for multi-turn rows")
        prompt = row["prompt"][0]["content"] if row["prompt"] else ""
        if self.prompt_template is not None:
            prompt = self.prompt_template.format(prompt=prompt)
        return prompt, row["chosen"][0]["content"], row["rejected"][0]["content"]

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
        """Fit the pair into ``max_length`` and build ids and labels; a pair without prompt
        tokens is skipped (``no_prompt_tokens``).

        Only a pair that does not fit is truncated: the prompt keeps its end (the last turns, and
        a leading BOS) up to ``max_prompt_length`` tokens, then each response keeps its start up
        to ``max_length`` minus the prompt's tokens, end token included: a cut response loses
        its end token, since it must not teach the model to stop mid-sentence.
        """
        if not prompt:
            # A causal LM scores each token from the ones before it: the first response token
            # would have no logit, so the pair's log-prob would silently lack it.
            raise RowProblem("no_prompt_tokens", "the prompt has no tokens and the tokenizer "
                             "adds no BOS: the first response token cannot be scored")
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


def unwrap_transcript(prompt: list[dict]) -> list[dict]:
    """A prompt that is one user message holding a whole HH transcript (``\\n\\nHuman: ...
    \\n\\nAssistant:``, as a standard-format dataset cut from HH-RLHF stores it) as its turns;
    any other prompt as it is. Rendered as one user message, the transcript would be wrapped in
    a second ``Human:``/``Assistant:`` layer (or a chat template's user turn)."""
    if len(prompt) != 1 or prompt[0]["role"] != "user":
        return prompt
    text = prompt[0]["content"]
    text = text if text.startswith("\n\n") else "\n\n" + text
    if not text.rstrip().endswith("\n\nAssistant:"):
        return prompt
    try:
        turns = formats.parse_transcript(text.rstrip(), "prompt")
    except RowProblem:
        return prompt
    if turns[0]["role"] != "user":
        return prompt
    # The trailing "Assistant:" is the generation prompt, which rendering adds back.
    return turns[:-1]


def _spaced(content: str) -> str:
    return content if content.startswith(" ") else " " + content


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
        pair_tokenizer.mode,
        pair_tokenizer.prompt_template,
        *(Path(module.__file__).read_text() for module in (sys.modules[__name__], formats)),
    ])


def tokenize_preferences(
    ds: Dataset,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    chat_template: str = "auto",
    prompt_template: str | None = None,
    strict: bool = False,
    num_proc: int | None = None,
) -> tuple[Dataset, FilterReport]:
    """Tokenize normalised preference rows; skip (or, ``strict``, refuse) bad ones.

    ``ds`` has the columns of ``dpo.data.formats`` (``row_index`` and ``problem`` are optional, so a
    hand-made dataset of ``prompt``/``chosen``/``rejected`` messages works too). ``chat_template``
    (``CHAT_TEMPLATE_MODES``) says how each pair becomes text: ``"auto"`` renders it with the
    tokenizer's chat template when it has one, ``"plain"`` (and ``"auto"`` without a template) as
    HH-style plain text (``\\n\\nHuman: ...\\n\\nAssistant: ...``); in both, a prompt that is
    already an HH transcript is split into its turns first (``unwrap_transcript``). ``"none"``
    takes the prompt and response texts as they are, the prompt through ``prompt_template``
    (``"...{prompt}..."``, only with ``"none"``) if given; rows that are conversations are
    skipped as ``not_raw_text``. Every response ends with one terminator: the token the chat
    template ends an assistant turn with, else EOS (see ``_PairTokenizer``); the prompt gets the
    tokenizer's BOS when the tokenizer adds one itself, never twice. A row the chat template
    refuses is skipped as ``template_error``.
    ``max_prompt_length`` defaults to ``max_length // 2``; see
    ``_PairTokenizer.truncate_and_label`` for the truncation rules.

    Returns the tokenized rows (see the module docstring for the columns) and a ``FilterReport``.
    Raises ``NoPairsLeft`` (a ``ValueError``) when no row is left, and ``ValueError`` in
    ``strict`` mode for the first bad row.
    """
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if not 0 < max_prompt_length <= max_length:
        raise ValueError(
            f"need 0 < max_prompt_length <= max_length, got {max_prompt_length} and {max_length}"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; DPO needs one to end each response")
    check_text_settings(chat_template, prompt_template)
    if "row_index" not in ds.column_names:
        ds = ds.add_column("row_index", list(range(len(ds))))

    pair_tokenizer = _PairTokenizer(
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        mode="plain" if chat_template == "auto" and tokenizer.chat_template is None
        else chat_template,
        prompt_template=prompt_template,
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
        raise NoPairsLeft(report)
    kept = [i for i, problem in enumerate(problems) if not problem]
    return tokenized.select(kept).remove_columns(["problem", "truncated"]), report


def check_text_settings(chat_template: str, prompt_template: str | None) -> None:
    """Raise ``ValueError`` (one line) for an unknown mode or an unusable prompt template."""
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template {chat_template!r} is not one of "
                         f"{', '.join(CHAT_TEMPLATE_MODES)}")
    if prompt_template is None:
        return
    if chat_template != "none":
        # A chat template or the plain layout already frames the prompt; a second frame inside
        # the user turn is rarely meant, and which turn of a conversation would it wrap?
        raise ValueError(f"prompt_template applies to chat_template none (raw text for base "
                         f"models), not {chat_template}")
    try:
        fields = [f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
                  for _, name, spec, conversion in string.Formatter().parse(prompt_template)
                  if name is not None]
    except ValueError as e:  # a lone brace
        fields = [str(e)]
    odd = [written for written in fields if written != "{prompt}"]
    if odd:
        raise ValueError(f"prompt_template {prompt_template!r} may hold only {{prompt}}, found "
                         f"{odd[0]}; write a literal brace as {{{{ or }}}}")
    if not fields:
        raise ValueError(f"prompt_template {prompt_template!r} has no {{prompt}}, so the "
                         f"prompt would be dropped")
