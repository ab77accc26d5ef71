"""Rendering a preference pair as text: the prompt text and the two response bodies.

Its own module because choosing the text is a question apart from tokenizing it: which chat
template mode (``--chat-template``), which token ends an assistant turn, and which rendering of the
prompt opens both conversations, so that the labels later cover the response and nothing else.
``dpo.data.tokenize`` turns the texts this module returns into ids and labels.
"""
from __future__ import annotations

import functools
import json
import string

from jinja2 import TemplateError

from dpo.data.errors import RowProblem
from dpo.data.messages import expand, extra_fields, has_reasoning
from dpo.data.transcripts import parse_transcript

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
# A tool that shows whether the chat template renders tools at all.
PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_tool", "description": "Shows whether the template renders tools.",
    "parameters": {"type": "object", "properties": {}}}}
PROBE_CALL = {"role": "assistant", "content": "", "fields": json.dumps({"tool_calls": [
    {"type": "function", "function": {"name": "probe_tool", "arguments": {}}}]})}


class PairRenderer:
    """Turns a normalised row into (prompt text, chosen body, rejected body).

    A row whose conversation the chat template refuses raises ``RowProblem`` (``template_error``:
    Gemma's raises unless roles alternate user/assistant), as does one whose prompt rendering
    opens neither conversation (``template_mismatch``).

    Each response ends with one terminator, ``end_text``/``end_id``: the special token the chat
    template ends an assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``),
    which need not be the tokenizer's EOS (a base checkpoint's ``<eos>``/``<|end_of_text|>``).
    Without a chat template, or with one that writes no special token right after the content, it
    is the EOS. The bodies end before it; the tokenizer adds it back as one id.

    ``mode`` is ``"auto"`` (the chat template; the caller passes ``"plain"`` for a tokenizer
    without one), ``"plain"`` or ``"none"``: raw text, see ``raw_texts``.

    Every rendering gets ``chat_template_kwargs`` (``enable_thinking``, ...) updated by the row's
    own, and the row's ``tools``, else ``tools`` (the run's ``--tools-file``). Plain text has no
    layout for tools, tool calls or reasoning: such a row is ``needs_chat_template``.
    """

    def __init__(self, tokenizer, *, mode, prompt_template=None, chat_template_kwargs=None,
                 tools=None):
        self.tokenizer = tokenizer
        self.mode = mode
        self.prompt_template = prompt_template
        self.kwargs = dict(chat_template_kwargs or {})
        self.tools = tools or None
        self.use_chat_template = mode == "auto"
        self.end_text, self.end_id = tokenizer.eos_token, tokenizer.eos_token_id
        if self.use_chat_template:
            self.end_text, self.end_id = self.end_of_turn()

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

    @functools.cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template writes tools into the conversation at all (Gemma 3's
        does not): a row's tools are then silently absent, which the filter report says."""
        probe = END_OF_TURN_PROBE[:1]
        return self.use_chat_template and self.render(probe, tools=[PROBE_TOOL]) != \
            self.render(probe)

    @functools.cached_property
    def renders_tool_calls(self) -> bool:
        """Whether the chat template writes an assistant's tool calls (Llama 3's does not): a
        row that has some is dropped, since its call would be trained or shown as nothing."""
        if not self.use_chat_template:
            return False
        user = END_OF_TURN_PROBE[0]
        try:
            return self.render([user, PROBE_CALL]) != self.render([user, {**PROBE_CALL,
                                                                        "fields": ""}])
        except TemplateError:
            return False

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False,
               tools: list[dict] | None = None, kwargs: dict | None = None) -> str:
        """The conversation as text: the chat template's, with every field of each message, the
        tools and the template options (``kwargs``, default the run's); or HH-style plain text,
        where a content that starts with its own space (HH-derived strings: ``" Sure, ..."``)
        gets no second one after the label."""
        if self.use_chat_template:
            if not messages:  # templates refuse an empty conversation; it renders as nothing
                return ""
            return self.tokenizer.apply_chat_template(
                [expand(m) for m in messages], tools=tools, tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **(self.kwargs if kwargs is None else kwargs),
            )
        text = "".join(f"\n\n{PLAIN_LABELS[m['role']]}:{_spaced(m['content'])}" for m in messages)
        return text + "\n\nAssistant:" if add_generation_prompt else text

    def prompt_candidates(self, prompt: list[dict], **context):
        """Texts that may open every prompt+response rendering, in order of preference.

        First the generation prompt, what the model is given when it answers: with Qwen3's
        thinking on (its default) that is ``<|im_start|>assistant\\n``, so a response's thinking
        block, empty or not, is labelled as the response it is; with ``enable_thinking: false``
        the empty block ``<think>\\n\\n</think>\\n\\n`` is part of the generation prompt and
        so of the prompt. Then the text before a sentinel response's content, for a template
        whose assistant turn does not open with its generation prompt.
        """
        if prompt or not self.use_chat_template:
            yield self.render(prompt, add_generation_prompt=True, **context)
        if self.use_chat_template:
            sentinel = [*prompt, {"role": "assistant", "content": CONTENT_SENTINEL}]
            rendered = self.render(sentinel, **context)
            if CONTENT_SENTINEL in rendered:
                yield rendered[: rendered.index(CONTENT_SENTINEL)]

    def context(self, row: dict) -> dict:
        """The row's ``tools`` and template options (``kwargs``): its own, else the run's."""
        tools = json.loads(row["tools"]) if row.get("tools") else self.tools
        kwargs = json.loads(row["chat_template_kwargs"]) if row.get("chat_template_kwargs") \
            else {}
        return {"tools": tools, "kwargs": {**self.kwargs, **kwargs}}

    def split_texts(self, row: dict) -> tuple[str, str, str]:
        """(prompt text, chosen body, rejected body); the bodies end before the turn's end."""
        if not self.use_chat_template:
            self._check_plain(row)
        elif not self.renders_tool_calls and any(
                "tool_calls" in extra_fields(m)
                for m in [*row["prompt"], *row["chosen"], *row["rejected"]]):
            raise RowProblem("unrendered_tool_calls", "the chat template does not write tool "
                             "calls, so the call would be read as an empty message")
        if self.mode == "none":
            return self.raw_texts(row)
        prompt = unwrap_transcript(row["prompt"])
        context = self.context(row) if self.use_chat_template else {}
        try:
            chosen = self.render([*prompt, *row["chosen"]], **context)
            rejected = self.render([*prompt, *row["rejected"]], **context)
            candidates = list(self.prompt_candidates(prompt, **context))
        except TemplateError as e:  # raised by the template itself (raise_exception)
            raise RowProblem("template_error", _one_line(e)) from None
        for prompt in candidates:
            if chosen.startswith(prompt) and rejected.startswith(prompt):
                return prompt, self._body(chosen[len(prompt):]), self._body(rejected[len(prompt):])
        if has_reasoning([*row["chosen"], *row["rejected"]]):
            raise RowProblem("template_mismatch", "a response's reasoning cannot follow the "
                             "prompt the template renders for generation (chat_template_kwargs "
                             f"{json.dumps(context['kwargs'])}: thinking off?)")
        raise RowProblem("template_mismatch", "no rendering of the prompt opens both conversations")

    def _check_plain(self, row: dict) -> None:
        """Plain and raw text have no layout for tools, tool calls, reasoning or template
        options: a row that holds any is refused rather than rendered without them."""
        what = "tools" if row.get("tools") else \
            "chat_template_kwargs" if row.get("chat_template_kwargs") else next(
                (key for m in [*row["prompt"], *row["chosen"], *row["rejected"]]
                 for key in ("tool_calls", "reasoning_content") if key in extra_fields(m)), None)
        if what:
            raise RowProblem("needs_chat_template", f"the row has {what}, which only a chat "
                             f"template renders (chat_template {self.mode}"
                             f"{'' if self.mode != 'plain' else ' or no template'})")

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
        turns = parse_transcript(text.rstrip(), "prompt")
    except RowProblem:
        return prompt
    if turns[0]["role"] != "user":
        return prompt
    # The trailing "Assistant:" is the generation prompt, which rendering adds back.
    return turns[:-1]


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


def _spaced(content: str) -> str:
    return content if content.startswith(" ") else " " + content


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
