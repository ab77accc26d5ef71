"""One message of a conversation with every field a chat template reads, and a row's tools and
template options.

A message is normalised to ``role``, ``content`` and ``fields``: a JSON object of everything else
it carries (``tool_calls``, ``reasoning_content``, ``name``, ``tool_call_id``, or a key this
project does not know), so that Arrow holds messages of any shape in one schema and the chat
template gets each message back as it came (``expand``). A row's ``tools`` (JSON schemas) and
``chat_template_kwargs`` are kept beside its messages as JSON text in the same way.

Null values inside tool schemas, tool calls and extra fields are dropped: when ``datasets``
loads JSON rows into Arrow it fills a key that some rows lack with null in the others, and a
template would render those nulls (``"enum": null``) into the prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

from datasets import Value

from dpo.data.errors import RowProblem
from dpo.data.images import PARTS_KEY, split_parts

MESSAGE = {"role": Value("string"), "content": Value("string"), "fields": Value("string")}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT and other dumps name the roles differently; anything else is a malformed row.
ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "ipython": "tool",
}
# Keys that name the role and the content in the two layouts, and this module's own ``fields``
# (a normalised row normalised again); every other key is kept.
LAYOUT_KEYS = ("role", "content", "from", "value", "fields")
# Keyword arguments of apply_chat_template that the trainer sets itself.
RESERVED_KWARGS = ("conversation", "tools", "documents", "tokenize", "add_generation_prompt",
                   "continue_final_message", "return_dict", "return_tensors", "padding",
                   "truncation", "max_length", "chat_template")


def to_message(value, where: str) -> dict:
    """One message dict (``role``/``content`` or ShareGPT's ``from``/``value``) normalised.

    ShareGPT's ``function_call`` turn (LLaMA-Factory) holds its call as JSON text: it becomes an
    assistant message with ``tool_calls``. A message with tool calls may have no content.
    """
    if not isinstance(value, dict):
        raise RowProblem("malformed", f"{where} is a {type(value).__name__}, not a message")
    role = value.get("role") if value.get("role") is not None else value.get("from")
    content = value.get("content") if value.get("content") is not None else value.get("value")
    if role is None:
        raise RowProblem("missing_field", f"{where} has no role")
    fields = {**extra_fields(value),
              **{k: v for k, v in drop_nulls(value).items() if k not in LAYOUT_KEYS}}
    if role == "function_call" and isinstance(content, str) and "tool_calls" not in fields:
        calls = _json_or_none(content)
        if isinstance(calls, (dict, list)):
            fields["tool_calls"] = calls if isinstance(calls, list) else [calls]
            content = ""
    if content is None and "tool_calls" in fields:
        content = ""
    if isinstance(content, list):  # parts (vision data, dpo.data.images)
        content, parts = split_parts(content, where)
        if parts:
            fields[PARTS_KEY] = parts
    if content is None:
        raise RowProblem("missing_field", f"{where} has no content")
    if not isinstance(content, str):
        raise RowProblem("not_a_string", f"{where}.content is a {type(content).__name__}")
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise RowProblem("malformed", f"{where} has unknown role {role!r}")
    if "tool_calls" in fields:
        fields["tool_calls"] = _tool_calls(fields["tool_calls"], f"{where}.tool_calls")
    return {"role": role, "content": content,
            "fields": json.dumps(fields, ensure_ascii=False) if fields else ""}


def to_messages(value, field: str, default_role: str) -> list[dict]:
    """Turn one field's value into a list of ``{role, content}`` messages.

    A string becomes one message with ``default_role``; a dict is one message; a list is a list of
    messages. Raises ``RowProblem`` naming ``field`` (and the message's position) when it cannot.
    """
    if value is None:
        raise RowProblem("missing_field", f"{field} is missing")
    if isinstance(value, str):
        return [{"role": default_role, "content": value, "fields": ""}]
    if isinstance(value, dict):
        return [to_message(value, field)]
    if isinstance(value, list):
        return [to_message(m, f"{field}[{i}]") for i, m in enumerate(value)]
    raise RowProblem(
        "not_a_string",
        f"{field} is a {type(value).__name__}, expected a string or a list of messages",
    )


def expand(message: dict) -> dict:
    """The message as a chat template reads it: role, content and its other fields."""
    fields = json.loads(message["fields"]) if message.get("fields") else {}
    # A message with images: its parts are its content (the text alone is in "content").
    content = fields.pop(PARTS_KEY, None) or message["content"]
    return {"role": message["role"], "content": content, **fields}


def extra_fields(message: dict) -> dict:
    """The fields of a message beyond role and content (``{}`` for none)."""
    fields = message.get("fields")
    return json.loads(fields) if isinstance(fields, str) and fields else {}


def has_text(message: dict) -> bool:
    """Whether the message says anything: content, an image, reasoning or a tool call."""
    fields = extra_fields(message)
    return bool(message["content"].strip() or fields.get("tool_calls") or fields.get(PARTS_KEY)
                or str(fields.get("reasoning_content") or "").strip())


def has_reasoning(messages: list[dict]) -> bool:
    """Whether a message carries a thinking block (a field, or ``</think>`` in its text)."""
    return any(extra_fields(m).get("reasoning_content") or "</think>" in m["content"]
               for m in messages)


def tools_of(value, where: str = "tools") -> list[dict] | None:
    """A row's (or ``--tools-file``'s) tool schemas as a list of dicts, ``None`` for none.

    Accepts the list, or its JSON text (LLaMA-Factory stores it so). Each schema is OpenAI's
    ``{"type": "function", "function": {"name": ..., "parameters": ...}}`` or the bare
    ``{"name": ..., "parameters": ...}`` that templates also read."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        parsed = _json_or_none(value)
        if parsed is None:
            raise RowProblem("malformed", f"{where} is text that is not JSON")
        value = parsed
    if not isinstance(value, list):
        raise RowProblem("malformed", f"{where} is a {type(value).__name__}, not a list of "
                         "tool schemas")
    for i, schema in enumerate(value):
        if not isinstance(schema, dict):
            raise RowProblem("malformed", f"{where}[{i}] is a {type(schema).__name__}, not a "
                             "tool schema")
        if not _name_of(schema):
            raise RowProblem("malformed", f"{where}[{i}] has no function name")
    return drop_nulls(value)


def kwargs_of(value, where: str = "chat_template_kwargs") -> dict:
    """A row's chat-template options as a dict (``{}`` for none); JSON text is parsed."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        value = _json_or_none(value)
    if not isinstance(value, dict):
        raise RowProblem("malformed", f"{where} is not a mapping of option names to values")
    reserved = [key for key in value if key in RESERVED_KWARGS]
    if reserved:
        raise RowProblem("malformed", f"{where} sets {reserved[0]!r}, which the trainer sets")
    return drop_nulls(value)


def as_json(value) -> str:
    """``value`` as the JSON text a normalised row stores (``""`` for none)."""
    return json.dumps(value, ensure_ascii=False) if value else ""


def drop_nulls(value):
    """``value`` without null-valued keys, at any depth."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def check_template_inputs(chat_template: str, kwargs, tools_file: str | None) -> None:
    """Raise ``ValueError`` (one line) for template options that are not a mapping, or a tools
    file that is not a list of schemas, or either without a chat template."""
    if kwargs is not None:
        _as_value_error(kwargs_of, kwargs)
    if tools_file is not None:
        read_tools_file(tools_file)
    if chat_template != "auto" and (kwargs or tools_file):
        what = "chat_template_kwargs" if kwargs else "tools_file"
        raise ValueError(f"{what} needs chat_template auto, not {chat_template}: only a chat "
                         "template renders them")


def read_tools_file(path: str) -> list[dict] | None:
    """The tool schemas in the JSON file ``path`` (``--tools-file``); ``ValueError`` naming the
    file when it cannot be read or holds no list of schemas."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"tools_file {path}: {e.strerror or e}") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"tools_file {path} is not JSON: {e}") from None
    return _as_value_error(tools_of, value, f"tools_file {path}")


def _as_value_error(check, *args):
    try:
        return check(*args)
    except RowProblem as e:
        raise ValueError(str(e).partition(": ")[2]) from None


def _tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise RowProblem("malformed", f"{where} is a {type(calls).__name__}, not a list")
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise RowProblem("malformed", f"{where}[{i}] is a {type(call).__name__}, not a call")
        if not _name_of(call):
            raise RowProblem("malformed", f"{where}[{i}] has no function name")
        function = call.get("function", call)
        if isinstance(function.get("arguments"), str):  # templates print a dict as JSON
            arguments = _json_or_none(function["arguments"])
            if isinstance(arguments, dict):
                function["arguments"] = arguments
    return calls


def _name_of(item: dict) -> str | None:
    function = item.get("function")
    name = function.get("name") if isinstance(function, dict) else item.get("name")
    return name if isinstance(name, str) and name.strip() else None


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None
