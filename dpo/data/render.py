"""Rendering a preference pair as text: the prompt text and the two response bodies.

Its own module because choosing the text is a question apart from tokenizing it: which chat
template mode (``--chat-template``), which token ends an assistant turn, and which rendering of the
prompt opens both conversations, so that the labels later cover the response and nothing else.
``dpo.data.tokenize`` turns the texts this module returns into ids and labels.
"""
from __future__ import annotations

import string

from jinja2 import TemplateError

from dpo.data import formats
from dpo.data.formats import RowProblem

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
    """

    def __init__(self, tokenizer, *, mode, prompt_template=None):
        self.tokenizer = tokenizer
        self.mode = mode
        self.prompt_template = prompt_template
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
