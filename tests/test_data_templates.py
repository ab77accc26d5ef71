"""Chat templates in tokenization (dpo.data): the token a template ends an assistant turn with
ends each response's labels once, and a template that raises on a row skips that row.

The ``shared`` tests run the real Gemma 3, Llama 3.1 and Qwen3 tokenizers from ../shared, as
shipped (their EOS is the end-of-turn token) and with the EOS of their base checkpoints (where
the template's end-of-turn token and the EOS differ).
"""
import json

import pytest
from datasets import Dataset

from dpo.data import IGNORE_INDEX, load_preference_splits, tokenize_preferences
from tests.conftest import (
    GEMMA3_TOKENIZER,
    LLAMA3_1_TOKENIZER,
    QWEN3_TOKENIZER,
    SHARED_DATA,
    load_shared_tokenizer,
    require_shared,
)
from tests.test_data import assistant, user

ROLES_MUST_ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."


def system(text):
    return {"role": "system", "content": text}


def messages_dataset(rows):
    return Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])


def response_of(ids, labels):
    return [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]


# ------------------------------------------------------------------------------------------
# A tiny template (no ../shared needed)
# ------------------------------------------------------------------------------------------

# Ends each turn with its own <|endoftext|> whatever the tokenizer's EOS is, and refuses a
# system message as Gemma 1/2's templates do.
TURN_END_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture
def end_of_turn_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with TURN_END_TEMPLATE and an EOS that is not the turn's end, as a
    base checkpoint's tokenizer paired with a chat template."""
    tiny_tokenizer.chat_template = TURN_END_TEMPLATE
    tiny_tokenizer.add_special_tokens({"eos_token": "<|end|>"})
    assert tiny_tokenizer.eos_token_id != tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return tiny_tokenizer


def test_labels_end_with_the_templates_end_of_turn_not_eos(end_of_turn_tokenizer):
    """The response ends with the template's <|endoftext|> once and never with the EOS; the
    sequence is exactly the template's rendering."""
    tokenizer = end_of_turn_tokenizer
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ds = messages_dataset([([user("hello")], [assistant("hi there")], [assistant("go away")])])
    row = tokenize_preferences(ds, tokenizer, max_length=128)[0][0]
    for side, content in (("chosen", "hi there"), ("rejected", "go away")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        response = response_of(ids, labels)
        assert tokenizer.decode(response) == f"{content}<|endoftext|>"
        assert response.count(end) == 1 and response[-1] == end
        assert tokenizer.eos_token_id not in ids
        rendered = tokenizer.apply_chat_template([user("hello"), assistant(content)],
                                                 tokenize=False)
        assert tokenizer.decode(ids) == "<s>" + rendered.rstrip()


def test_plain_text_still_ends_with_eos(end_of_turn_tokenizer):
    """Without the chat template there is no turn token: the response ends with the EOS."""
    tokenizer = end_of_turn_tokenizer
    ds = messages_dataset([([user("hello")], [assistant("hi there")], [assistant("go away")])])
    row = tokenize_preferences(ds, tokenizer, max_length=128, chat_template="plain")[0][0]
    response = response_of(row["chosen_input_ids"], row["chosen_labels"])
    assert tokenizer.decode(response) == " hi there<|end|>"


def test_template_that_raises_skips_the_row_with_its_message(end_of_turn_tokenizer):
    """A row the template refuses is template_error, with the template's message in the
    report; strict mode stops on it with one line naming the row and the message."""
    rows = [([user("a")], [assistant("b")], [assistant("c")]),
            ([system("be brief"), user("d")], [assistant("e")], [assistant("f")]),
            ([user("g")], [assistant("h")], [assistant("i")])]
    ds = messages_dataset(rows)
    tokenized, report = tokenize_preferences(ds, end_of_turn_tokenizer, max_length=64)
    assert report.dropped == {"template_error": 1} and report.examples == {"template_error": [1]}
    assert report.details["template_error"] == ["System role not supported"]
    assert 'template_error 1 (rows 1; "System role not supported")' in str(report)
    assert tokenized["row_index"] == [0, 2]
    with pytest.raises(ValueError) as raised:
        tokenize_preferences(ds, end_of_turn_tokenizer, max_length=64, strict=True)
    assert str(raised.value) == \
        "row 1: template_error: System role not supported (strict mode)"


def test_template_that_cannot_render_a_plain_exchange_is_one_clear_error(tiny_tokenizer):
    """A template that refuses even a user turn and a reply fails the run, not each row."""
    tiny_tokenizer.chat_template = "{{ raise_exception('needs a system message first') }}"
    ds = messages_dataset([([user("a")], [assistant("b")], [assistant("c")])])
    with pytest.raises(ValueError, match="cannot render a user turn.*needs a system message"):
        tokenize_preferences(ds, tiny_tokenizer, max_length=64)


# ------------------------------------------------------------------------------------------
# The real tokenizers (../shared)
# ------------------------------------------------------------------------------------------

# name -> (directory, the template's end-of-turn token, the EOS of the base checkpoint)
REAL = {
    "gemma3": (GEMMA3_TOKENIZER, "<end_of_turn>", "<eos>"),
    "llama3_1": (LLAMA3_1_TOKENIZER, "<|eot_id|>", "<|end_of_text|>"),
    "qwen3": (QWEN3_TOKENIZER, "<|im_end|>", "<|endoftext|>"),
}
# ShareGPT rows Gemma's template refuses (two user turns in a row, or no user turn first)
# that the Llama 3.1 and Qwen3 templates render.
EXTRA_ROWS = [
    {"conversations": [{"from": "human", "value": "Hi."}, {"from": "human", "value": "Hello?"}],
     "chosen": {"from": "gpt", "value": "Hello, how can I help?"},
     "rejected": {"from": "gpt", "value": "What."}},
    {"conversations": [{"from": "system", "value": "Be kind."},
                       {"from": "human", "value": "One."}, {"from": "human", "value": "Two."}],
     "chosen": {"from": "gpt", "value": "Three."}, "rejected": {"from": "gpt", "value": "Four."}},
    {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                       {"from": "human", "value": "Q2"}, {"from": "human", "value": "Q2 again"}],
     "chosen": {"from": "gpt", "value": "A2"}, "rejected": {"from": "gpt", "value": "No."}},
]
LLAMAFACTORY_ROWS = 300


@pytest.fixture(scope="module")
def llamafactory_with_bad_turns(tmp_path_factory):
    """llamafactory_dpo_en_demo.json (300 rows: multi-turn, 80 system prompts) and then the
    EXTRA_ROWS, as rows 300-302 of one file."""
    rows = json.loads(require_shared(SHARED_DATA / "llamafactory_dpo_en_demo.json").read_text())
    assert len(rows) == LLAMAFACTORY_ROWS
    path = tmp_path_factory.mktemp("data") / "pairs.json"
    path.write_text(json.dumps(rows + EXTRA_ROWS))
    train, _ = load_preference_splits(str(path), num_samples=None, eval_samples=0, seed=0)
    return train


# The quick tier (not `slow`) keeps one case per tokenizer: each EOS setting, and Gemma's refusals.
QUICK_REAL = {("gemma3", True), ("llama3_1", True), ("qwen3", False)}


@pytest.mark.shared
@pytest.mark.parametrize("name,base_eos", [
    pytest.param(name, base_eos, id=f"{name}-{'base_eos' if base_eos else 'as_shipped'}",
                 marks=() if (name, base_eos) in QUICK_REAL else pytest.mark.slow)
    for name in REAL for base_eos in (False, True)])
def test_real_templates_end_each_response_with_their_end_of_turn_once(
    llamafactory_with_bad_turns, name, base_eos, request
):
    """Every kept row is the template's exact rendering (BOS once), and its responses' labels
    end with the template's end-of-turn id, once, never followed or replaced by the EOS. Gemma
    skips the rows its template refuses as template_error, with its message."""
    directory, end_token, eos = REAL[name]
    # as shipped: the session's (tokenize_preferences leaves the tokenizer as it is)
    tokenizer = (load_shared_tokenizer(directory, eos_token=eos) if base_eos
                 else request.getfixturevalue(f"{name}_tokenizer"))
    assert (tokenizer.eos_token == end_token) != base_eos
    end = tokenizer.convert_tokens_to_ids(end_token)
    train = llamafactory_with_bad_turns
    tokenized, report = tokenize_preferences(train, tokenizer, max_length=32_768)

    extra = list(range(LLAMAFACTORY_ROWS, LLAMAFACTORY_ROWS + len(EXTRA_ROWS)))
    if name == "gemma3":
        assert (report.kept, report.dropped) == (LLAMAFACTORY_ROWS, {"template_error": 3})
        assert report.examples["template_error"] == extra
        assert report.details["template_error"] == [ROLES_MUST_ALTERNATE]
        assert f'template_error 3 (rows 300, 301, 302; "{ROLES_MUST_ALTERNATE}")' in str(report)
    else:
        assert (report.kept, report.dropped) == (len(train), {})
    assert report.truncated == 0

    sources = {row["row_index"]: row for row in train}
    for row in tokenized:
        source = sources[row["row_index"]]
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            response = response_of(ids, labels)
            assert labels[-1] == end and response.count(end) == len(source[side])
            if base_eos:
                assert tokenizer.eos_token_id not in response
            rendered = tokenizer.apply_chat_template([*source["prompt"], *source[side]],
                                                     tokenize=False)
            assert tokenizer.decode(ids) == rendered.rstrip()
            if tokenizer.bos_token is not None:
                assert ids[0] == tokenizer.bos_token_id and ids.count(ids[0]) == 1


@pytest.mark.shared
def test_gemma3_strict_data_stops_on_the_first_refused_row(llamafactory_with_bad_turns,
                                                           gemma3_tokenizer):
    """strict mode: one line with the row and the template's message."""
    with pytest.raises(ValueError) as raised:
        tokenize_preferences(llamafactory_with_bad_turns, gemma3_tokenizer, max_length=32_768,
                             strict=True)
    assert str(raised.value) == f"row 300: template_error: {ROLES_MUST_ALTERNATE} (strict mode)"


@pytest.mark.shared
def test_gemma3_folds_the_system_prompt_into_the_first_user_turn(gemma3_tokenizer):
    """Gemma 3's template writes the system prompt into the first user turn: that is prompt,
    unlabelled; an empty prompt (the reply would open the conversation) is template_error."""
    tokenizer = gemma3_tokenizer
    ds = messages_dataset([([system("Be brief."), user("Hi")], [assistant("Hello.")],
                            [assistant("Go.")]),
                           ([], [assistant("Hello.")], [assistant("Go.")])])
    tokenized, report = tokenize_preferences(ds, tokenizer, max_length=64)
    assert report.dropped == {"template_error": 1} and report.examples["template_error"] == [1]
    row = tokenized[0]
    prompt_ids = [t for t, label in zip(row["chosen_input_ids"], row["chosen_labels"])
                  if label == IGNORE_INDEX]
    assert tokenizer.decode(prompt_ids) == \
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.decode(response_of(row["chosen_input_ids"], row["chosen_labels"])) == \
        "Hello.<end_of_turn>"
