"""Thinking, tools and template options (dpo.data.messages, dpo.data.render): every message field
reaches the chat template, and exactly the response's tokens are labelled.

The ``shared`` tests use the real Qwen3 tokenizer from ../shared, and its Llama 3.1 tokenizer
twice: with the chat template it ships (Llama 3's, which writes neither tools nor tool calls)
and with the original Llama 3.1 template as TRL 1.16 keeps it (``trl/chat_templates/``), which
writes both. Expected token ids were read off the tokenizers by hand.
"""
import json
import re
from pathlib import Path

import pytest
from datasets import Dataset

from dpo.config import ConfigError, load_config
from dpo.data import IGNORE_INDEX, tokenize_preferences
from dpo.data.cache import cache_key
from dpo.data.errors import RowProblem
from dpo.data.formats import normalise
from dpo.data.messages import expand, to_message, tools_of
from dpo.eval.evaluation import sample_prompts

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
QUESTION = {"role": "user", "content": "Weather in Paris?"}
CALLING = {"role": "assistant", "content": "", "tool_calls": [CALL]}
RESULT = {"role": "tool", "content": "18C, sunny", "tool_call_id": "c1"}

# Qwen3 (hand-read): <think> \n\n </think> \n\n
EMPTY_THINK = [151667, 271, 151668, 271]
# <think> \n add ' them' \n </think> \n\n 4 <|im_end|>
THINK_ADD_THEM_4 = [151667, 198, 718, 1105, 198, 151668, 271, 19, 151645]
# <tool_call> \n {" name ": ' "' get _weather ", ' "' arguments ": ' {"' city ": ' "' Paris "}}\n
# </tool_call> <|im_end|>
QWEN3_CALL = [151657, 198, 4913, 606, 788, 330, 455, 69364, 497, 330, 16370, 788, 5212, 8926, 788,
              330, 59604, 95642, 151658, 151645]
QWEN3_PROMPT_END = [151644, 77091, 198]  # <|im_start|> assistant \n
# Llama 3.1: {" name ": ' "' get _weather ", ' "' parameters ": ' {"' city ": ' "' Paris "}}
# <|eot_id|>
LLAMA_CALL = [5018, 609, 794, 330, 456, 70464, 498, 330, 14105, 794, 5324, 9103, 794, 330, 60704,
              32075, 128009]


def labelled(row, side="chosen"):
    return [t for t, label in zip(row[f"{side}_input_ids"], row[f"{side}_labels"])
            if label != IGNORE_INDEX]


def prompt_ids(row, side="chosen"):
    return [t for t, label in zip(row[f"{side}_input_ids"], row[f"{side}_labels"])
            if label == IGNORE_INDEX]


def rows(*pairs, **columns):
    """Conversational source rows: (prompt, chosen, rejected) message lists, plus columns."""
    return Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r,
                               **{k: v[i] for k, v in columns.items()}}
                              for i, (p, c, r) in enumerate(pairs)])


def tokenized(ds, tokenizer, **settings):
    return tokenize_preferences(normalise(ds), tokenizer, max_length=1024, **settings)


# ------------------------------------------------------------------------------------------
# Messages keep every field
# ------------------------------------------------------------------------------------------


def test_every_field_of_a_message_is_kept_and_given_back():
    """Tool calls, reasoning, a tool's name and call id, and a field nobody here knows are
    kept; nulls (Arrow's filling of absent keys) are not; JSON-text arguments become a dict,
    as templates print them."""
    message = to_message({"role": "assistant", "content": None, "reasoning_content": "think",
                          "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}',
                                                       "unused": None}}],
                          "weight": 0.5, "name": None}, "chosen[0]")
    assert expand(message) == {"role": "assistant", "content": "", "reasoning_content": "think",
                               "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
                               "weight": 0.5}
    assert to_message(message, "again") == message  # a normalised message normalises to itself
    tool = to_message({"from": "observation", "value": "18C", "tool_call_id": "c1"}, "p[2]")
    assert expand(tool) == {"role": "tool", "content": "18C", "tool_call_id": "c1"}


def test_sharegpt_function_call_turns_become_tool_calls():
    """LLaMA-Factory's ShareGPT tool rows: a function_call turn holds its call as JSON text,
    observation is the tool's answer, and tools is a JSON string."""
    ds = Dataset.from_list([{
        "conversations": [{"from": "human", "value": "Weather in Paris?"},
                          {"from": "function_call",
                           "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                          {"from": "observation", "value": "18C, sunny"}],
        "chosen": {"from": "gpt", "value": "It is 18C and sunny."},
        "rejected": {"from": "gpt", "value": "I cannot know."},
        "tools": json.dumps([WEATHER["function"]])}])
    row = normalise(ds)[0]
    assert row["problem"] == ""
    call = expand(row["prompt"][1])
    assert call == {"role": "assistant", "content": "", "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert expand(row["prompt"][2])["role"] == "tool"
    assert json.loads(row["tools"]) == [WEATHER["function"]]


@pytest.mark.parametrize("value, message", [
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]},
     r"^malformed: chosen\[0\].tool_calls\[0\] has no function name$"),
    ({"role": "assistant", "content": "", "tool_calls": {"name": "f"}},
     r"^malformed: chosen\[0\].tool_calls is a dict, not a list$"),
])
def test_a_bad_tool_call_is_one_line(value, message):
    with pytest.raises(RowProblem, match=message):
        to_message(value, "chosen[0]")


@pytest.mark.parametrize("tools, message", [
    ({"name": "f"}, "tools is a dict, not a list of tool schemas"),
    (["get_weather"], r"tools\[0\] is a str, not a tool schema"),
    ([{"type": "function", "function": {"description": "x"}}], r"tools\[0\] has no function name"),
    ("not json", "tools is text that is not JSON"),
])
def test_a_bad_tools_value_drops_its_row_in_one_line(tools, message):
    good = {"tools": json.dumps([WEATHER])}
    ds = rows(([QUESTION], [CALLING], [{"role": "assistant", "content": "Sunny."}]),
              ([QUESTION], [{"role": "assistant", "content": "Rain."}],
               [{"role": "assistant", "content": "Sunny."}]),
              tools=[tools if isinstance(tools, str) else json.dumps(tools), good["tools"]])
    first, second = normalise(ds)
    assert re.fullmatch(f"malformed: {message}", first["problem"])
    assert second["problem"] == "" and tools_of(second["tools"]) == [WEATHER]


# ------------------------------------------------------------------------------------------
# Qwen3: thinking on/off x responses with/without reasoning
# ------------------------------------------------------------------------------------------

TWO_PLUS_TWO = [{"role": "user", "content": "2+2?"}]
PLAIN_4 = [{"role": "assistant", "content": "4"}]
PLAIN_5 = [{"role": "assistant", "content": "5"}]
REASONED_4 = [{"role": "assistant", "content": "4", "reasoning_content": "add them"}]
INLINE_4 = [{"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}]


@pytest.mark.shared
def test_qwen3_thinking_on_labels_the_think_block(qwen3_tokenizer):
    """Thinking on (Qwen3's default): the prompt ends at the generation prompt
    `<|im_start|>assistant\\n`, so each response's think block is labelled: empty for a response
    without reasoning, filled for one with it, as a field or inline."""
    ds = rows((TWO_PLUS_TWO, PLAIN_4, PLAIN_5), (TWO_PLUS_TWO, REASONED_4, PLAIN_5),
              (TWO_PLUS_TWO, INLINE_4, PLAIN_5))
    for settings in ({}, {"chat_template_kwargs": {"enable_thinking": True}}):
        pairs, report = tokenized(ds, qwen3_tokenizer, **settings)
        assert report.kept == 3
        assert labelled(pairs[0]) == EMPTY_THINK + [19, 151645]  # ... 4 <|im_end|>
        assert labelled(pairs[1]) == labelled(pairs[2]) == THINK_ADD_THEM_4
        for row in pairs:
            assert prompt_ids(row)[-3:] == QWEN3_PROMPT_END
            assert labelled(row, "rejected") == EMPTY_THINK + [20, 151645]  # ... 5 <|im_end|>


@pytest.mark.shared
def test_qwen3_thinking_off_puts_the_empty_block_in_the_prompt(qwen3_tokenizer):
    """enable_thinking false: the generation prompt ends with the empty think block, so only
    the answer and <|im_end|> are labelled; a response with reasoning cannot follow that
    prompt and its row is dropped, counted, with the reason in one line."""
    ds = rows((TWO_PLUS_TWO, PLAIN_4, PLAIN_5), (TWO_PLUS_TWO, REASONED_4, PLAIN_5),
              (TWO_PLUS_TWO, PLAIN_5, INLINE_4))
    pairs, report = tokenized(ds, qwen3_tokenizer,
                              chat_template_kwargs={"enable_thinking": False})
    assert report.kept == 1 and report.dropped == {"template_mismatch": 2}
    assert "a response's reasoning cannot follow" in str(report)
    assert '{"enable_thinking": false}' in str(report)
    assert labelled(pairs[0]) == [19, 151645] and labelled(pairs[0], "rejected") == [20, 151645]
    assert prompt_ids(pairs[0])[-7:] == QWEN3_PROMPT_END + EMPTY_THINK
    # Generation prompts are these prompts: thinking off there too.
    cfg = load_config(["--num-sample-generations", "1", "--output-dir", "x"])
    assert sample_prompts(cfg, pairs) == [prompt_ids(pairs[0])]


@pytest.mark.shared
def test_a_rows_own_template_options_override_the_runs(qwen3_tokenizer):
    ds = rows((TWO_PLUS_TWO, PLAIN_4, PLAIN_5), (TWO_PLUS_TWO, PLAIN_4, PLAIN_5),
              chat_template_kwargs=[{"enable_thinking": False}, None])
    pairs, _ = tokenized(ds, qwen3_tokenizer)  # the run: thinking on
    assert labelled(pairs[0]) == [19, 151645]
    assert labelled(pairs[1]) == EMPTY_THINK + [19, 151645]


# ------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_qwen3_tool_call_response_trains_its_call_tokens(qwen3_tokenizer):
    """A response that is a tool call labels the call; a tool result in the prompt is kept;
    the row's tools reach the system prompt, the run's tools serve rows without their own."""
    ds = rows(([QUESTION], [CALLING], [{"role": "assistant", "content": "It is sunny."}]),
              ([QUESTION, CALLING, RESULT], [{"role": "assistant", "content": "18C, sunny."}],
               [{"role": "assistant", "content": "I cannot know."}]),
              tools=[[WEATHER], None])
    other = {**WEATHER, "function": {**WEATHER["function"], "name": "get_time"}}
    pairs, report = tokenized(ds, qwen3_tokenizer, tools=[other])
    assert report.kept == 2 and report.tools_unrendered == 0
    assert labelled(pairs[0]) == EMPTY_THINK + QWEN3_CALL
    first, second = (qwen3_tokenizer.decode(prompt_ids(row)) for row in pairs)
    assert '"name": "get_weather"' in first and "get_time" not in first
    assert '"name": "get_time"' in second  # the run's tools
    assert second.endswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                           '\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n'
                           '18C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n')
    assert qwen3_tokenizer.decode(labelled(pairs[1])) == \
        "<think>\n\n</think>\n\n18C, sunny.<|im_end|>"


@pytest.fixture(scope="module")
def llama3_1_tool_tokenizer(llama3_1_tokenizer):
    """The shared Llama 3.1 vocabulary with the original Llama 3.1 chat template (TRL keeps it:
    the copy in ../shared ships Llama 3's, which has no tools)."""
    trl = pytest.importorskip("trl", reason="trl (a test extra) keeps the Llama 3.1 template")
    tokenizer = llama3_1_tokenizer.__class__.from_pretrained(llama3_1_tokenizer.name_or_path)
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" /
                               "llama3_1.jinja").read_text()
    return tokenizer


@pytest.mark.shared
def test_llama3_1_renders_tools_and_trains_the_call(llama3_1_tool_tokenizer):
    tokenizer = llama3_1_tool_tokenizer
    ds = rows(([QUESTION], [CALLING], [{"role": "assistant", "content": "It is sunny."}]),
              ([QUESTION, CALLING, RESULT], [{"role": "assistant", "content": "18C, sunny."}],
               [{"role": "assistant", "content": "I cannot know."}]),
              tools=[[WEATHER], [WEATHER]])
    pairs, report = tokenized(ds, tokenizer)
    assert report.kept == 2 and report.tools_unrendered == 0
    assert labelled(pairs[0]) == LLAMA_CALL
    prompt = tokenizer.decode(prompt_ids(pairs[1]))
    assert prompt.startswith("<|begin_of_text|>") and prompt.count("<|begin_of_text|>") == 1
    assert '"name": "get_weather"' in prompt and "Environment: ipython" in prompt
    assert prompt.endswith('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
                           '<|start_header_id|>ipython<|end_header_id|>\n\n"18C, sunny"'
                           '<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n')
    assert tokenizer.decode(labelled(pairs[1])) == "18C, sunny.<|eot_id|>"


@pytest.mark.shared
def test_a_template_without_tools_warns_and_drops_calls(llama3_1_tokenizer):
    """The shared Llama tokenizer's own template writes neither tools nor tool calls: rows
    with tools are kept and counted in one warning; a row with a tool call is dropped (its
    call would read as an empty message)."""
    plain = ([QUESTION], [{"role": "assistant", "content": "Sunny."}],
             [{"role": "assistant", "content": "Rain."}])
    ds = rows(plain, plain, ([QUESTION], [CALLING], plain[2]), tools=[[WEATHER], [WEATHER], None])
    pairs, report = tokenized(ds, llama3_1_tokenizer)
    assert report.kept == 2 and report.tools_unrendered == 2
    assert report.dropped == {"unrendered_tool_calls": 1}
    assert str(report).endswith("warning: the chat template does not render tools, so 2 pairs "
                                "are trained without the tools they were given")


def test_plain_text_refuses_what_only_a_template_renders(tiny_tokenizer):
    plain = ([QUESTION], [{"role": "assistant", "content": "Sunny."}],
             [{"role": "assistant", "content": "Rain."}])
    ds = rows(plain, ([QUESTION], REASONED_4, PLAIN_5), plain, ([QUESTION], [CALLING], PLAIN_5),
              tools=[[WEATHER], None, None, None])
    pairs, report = tokenized(ds, tiny_tokenizer)  # no chat template: plain text
    assert report.kept == 1 and report.dropped == {"needs_chat_template": 3}
    assert "the row has tools, which only a chat template renders" in str(report)
    with pytest.raises(ValueError, match="^chat_template_kwargs need a chat template, and the "
                       r"pairs are rendered as plain text \(the tokenizer has no chat template\)"):
        tokenized(ds, tiny_tokenizer, chat_template_kwargs={"enable_thinking": False})


# ------------------------------------------------------------------------------------------
# The run's settings
# ------------------------------------------------------------------------------------------


def test_template_options_and_tools_key_the_tokenize_cache(tiny_chat_tokenizer):
    ds = normalise(rows((TWO_PLUS_TWO, PLAIN_4, PLAIN_5)))
    keys = {cache_key(ds, tiny_chat_tokenizer, {"max_length": 64, **extra}) for extra in (
        {}, {"chat_template_kwargs": {"enable_thinking": False}}, {"tools": [WEATHER]})}
    assert len(keys) == 3


def test_template_settings_are_checked_in_one_line(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    cfg = load_config(["--chat-template-kwargs", '{"enable_thinking": false}',
                       "--tools-file", str(tools), "--output-dir", "x"])
    assert cfg.chat_template_kwargs == {"enable_thinking": False} and cfg.tools_file == str(tools)
    yaml = tmp_path / "run.yaml"
    yaml.write_text("chat_template_kwargs:\n  enable_thinking: false\n")
    assert load_config(["--config", str(yaml)]).chat_template_kwargs == {"enable_thinking": False}
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "f"}')
    for flags, message in [
        (["--config", str(_yaml(tmp_path, "chat_template_kwargs: [1, 2]"))],
         re.escape("chat_template_kwargs must be a mapping, got [1, 2]")),
        (["--chat-template-kwargs", '{"tokenize": true}'],
         "chat_template_kwargs sets 'tokenize', which the trainer sets"),
        (["--tools-file", str(bad)], f"tools_file {bad} is a dict, not a list of tool schemas"),
        (["--tools-file", str(tmp_path / "none.json")], "tools_file .*none.json: No such file"),
        (["--chat-template-kwargs", '{"enable_thinking": false}', "--chat-template", "plain"],
         "chat_template_kwargs needs chat_template auto, not plain"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config([*flags, "--output-dir", "x"])


def test_chat_template_kwargs_flag_that_is_not_json_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_config(["--chat-template-kwargs", "enable_thinking=false"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "--chat-template-kwargs: expected a JSON mapping such as" in err


def _yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text + "\n")
    return path
