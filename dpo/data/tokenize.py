"""Tokenizing normalised preference rows: exact token boundaries, truncation, labels, and
validation with a report of the rows skipped.

The text each pair becomes comes from ``dpo.data.render``; this module finds the response's ids at
their boundary with the prompt's, truncates, labels, and maps all of it over a dataset
(``tokenize_preferences``), counting skipped rows in a ``dpo.data.report.FilterReport``.
"""
from __future__ import annotations

from datasets import Dataset

from dpo.data.fingerprint import tokens_fingerprint as _fingerprint
from dpo.data.formats import RowProblem, find_problem
from dpo.data.ranked import check_response, encode_more, more_bodies
from dpo.data.render import PairRenderer, check_text_settings
from dpo.data.report import FilterReport, NoPairsLeft

IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there

# The columns of a row that is skipped: it is dropped after the report is made.
UNUSABLE_PAIR = {
    "chosen_input_ids": [],
    "chosen_labels": [],
    "rejected_input_ids": [],
    "rejected_labels": [],
    "length": 0,
    "truncated": False,
    "tools_unrendered": False,
}
UNUSABLE_MORE = {"more_input_ids": [], "more_labels": []}


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


class _PairTokenizer:
    """``Dataset.map`` function (batched) that turns normalised rows into token ids.

    For each row its ``PairRenderer`` gives the prompt text and both responses' texts (the prompt
    text both conversations start with); this class tokenizes, truncates and labels. A row that
    cannot be used gets a ``problem`` (``"<reason>: <detail>"``) and empty ids instead of an
    exception, whether the renderer or the truncation found it.

    Each response ends with the renderer's one terminator (``end_id``): the chat template's end
    of turn, else the EOS. ``mode`` is ``"auto"``, ``"plain"`` or ``"none"`` (see
    ``PairRenderer``).
    """

    UNUSABLE = UNUSABLE_PAIR  # a vision tokenizer adds its columns (dpo.data.vision_tokenize)

    def __init__(self, tokenizer, *, max_length, max_prompt_length, mode, prompt_template=None,
                 chat_template_kwargs=None, tools=None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        if mode != "auto" and (chat_template_kwargs or tools):
            what = "chat_template_kwargs" if chat_template_kwargs else "tools"
            raise ValueError(f"{what} need a chat template, and the pairs are rendered as "
                             f"{mode} text" + (" (the tokenizer has no chat template)"
                                               if tokenizer.chat_template is None else ""))
        self.renderer = PairRenderer(tokenizer, mode=mode, prompt_template=prompt_template,
                                     chat_template_kwargs=chat_template_kwargs, tools=tools)
        self.end_id = self.renderer.end_id
        # Only a tokenizer that adds BOS itself (Llama) wants one; we add it at most once below.
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.bos_id = bos if adds_bos else None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        ranked = "more" in batch  # rankings: responses 3..N in `more` (dpo.data.ranked)
        # Loaded rows carry the problems found while normalising; hand-made ones may not.
        problems = [row.get("problem") or self.check_content(row) for row in rows]
        texts, more = {}, {}
        for i, row in enumerate(rows):
            if not problems[i]:
                try:
                    texts[i] = self.renderer.split_texts(row)
                    if ranked:
                        more[i] = more_bodies(self.renderer, row, texts[i][0])
                except RowProblem as problem:
                    problems[i] = str(problem)
        encoded = self.encode_rows(texts)

        unusable = {**self.UNUSABLE, **UNUSABLE_MORE} if ranked else self.UNUSABLE
        out = {name: [] for name in [*unusable, "problem"]}
        for i, problem in enumerate(problems):
            pair = unusable
            if not problem:
                try:
                    extra = encode_more(self, texts[i][0], more[i]) if ranked else None
                    pair = self.pair_columns(rows[i], texts[i][0], *encoded[i], more=extra)
                except RowProblem as skip:
                    problem = str(skip)
            unrendered = not problem and bool(rows[i].get("tools") or self.renderer.tools) \
                and not self.renderer.renders_tools
            for name, value in {**pair, "tools_unrendered": unrendered}.items():
                out[name].append(value)
            out["problem"].append(problem)
        return out

    @staticmethod
    def check_content(row: dict) -> str:
        problem = find_problem(row["prompt"], row["chosen"], row["rejected"],
                               paired="label" not in row)
        try:
            for k, response in enumerate(row.get("more") or []):
                check_response(response, f"more[{k}]")
        except RowProblem as more_problem:
            problem = problem or more_problem
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

    def pair_columns(self, row: dict, prompt_text: str, prompt: list[int], chosen: list[int],
                     rejected: list[int], more=None) -> dict:
        """The tokenized row's columns (``truncate_and_label``) from its ids."""
        return self.truncate_and_label(prompt, chosen, rejected, more=more)

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

    def truncate_and_label(self, prompt: list[int], chosen: list[int], rejected: list[int],
                           more: list[list[int]] | None = None):
        """Fit the pair into ``max_length`` and build ids and labels; a pair without prompt
        tokens is skipped (``no_prompt_tokens``). A ranking's responses 3..N (``more``) are
        truncated alike and give ``more_input_ids``/``more_labels`` (lists of lists).

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
        responses = [chosen, rejected, *(more or [])]
        longest = max(map(len, responses))
        truncated = len(prompt) + longest > self.max_length
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
            responses = [response[:budget] for response in responses]
            longest = min(longest, budget)
        masked = [IGNORE_INDEX] * len(prompt)
        (chosen, rejected), rest = responses[:2], responses[2:]
        out = {
            "chosen_input_ids": prompt + chosen,
            "chosen_labels": masked + chosen,
            "rejected_input_ids": prompt + rejected,
            "rejected_labels": masked + rejected,
            "length": len(prompt) + longest,
            "truncated": truncated,
        }
        if more is not None:
            out["more_input_ids"] = [prompt + response for response in rest]
            out["more_labels"] = [masked + response for response in rest]
        return out


def tokenize_preferences(
    ds: Dataset,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    chat_template: str = "auto",
    prompt_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    tools: list[dict] | None = None,
    strict: bool = False,
    num_proc: int | None = None,
    pair_class=_PairTokenizer,
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
    template ends an assistant turn with, else EOS (see ``PairRenderer``); the prompt gets the
    tokenizer's BOS when the tokenizer adds one itself, never twice. A row the chat template
    refuses is skipped as ``template_error``. ``chat_template_kwargs`` go to every rendering
    (a row's own ``chat_template_kwargs`` update them), and ``tools`` (schemas) to every row
    without its own; both need a chat template (``"auto"``).
    ``pair_class`` makes the row tokenizer (``dpo.data.vision_tokenize`` passes its own).
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

    pair_tokenizer = pair_class(
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        mode="plain" if chat_template == "auto" and tokenizer.chat_template is None
        else chat_template,
        prompt_template=prompt_template,
        chat_template_kwargs=chat_template_kwargs,
        tools=tools,
    )
    tokenized = ds.map(
        pair_tokenizer,
        batched=True,
        batch_size=256,
        remove_columns=[name for name in ds.column_names if name not in ("row_index", "label",
                                                                          "stages", "images")],
        num_proc=num_proc,
        new_fingerprint=_fingerprint(ds, pair_tokenizer),
        desc="tokenizing preference pairs",
    )
    problems, row_indices = list(tokenized["problem"]), list(tokenized["row_index"])
    report = FilterReport.from_rows(problems, row_indices, list(tokenized["truncated"]),
                                    tools_unrendered=sum(tokenized["tools_unrendered"]))
    if strict and report.kept < report.total:
        # The bad row that comes first in the source, where the user will look for it.
        row, problem = min((row, problem) for row, problem in zip(row_indices, problems) if problem)
        raise ValueError(f"row {row}: {problem} (strict mode)")
    if report.kept == 0:
        raise NoPairsLeft(report)
    kept = [i for i, problem in enumerate(problems) if not problem]
    return (tokenized.select(kept).remove_columns(["problem", "truncated", "tools_unrendered"]),
            report)
