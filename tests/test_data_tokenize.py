"""How a pair becomes text (``chat_template`` auto / plain / none, ``prompt_template``): the
token ids decode to exactly the expected text, and the labels cover exactly the response and its
one end token. Local tests use the tiny tokenizer from conftest; the ``shared`` ones use the real
Qwen3, Gemma3 and Llama 3.1 tokenizers and the seed's question/answer data from ../shared."""
import dataclasses
import json
import re

import pytest
from datasets import Dataset

from dpo.train.checkpoint import STATE_FILE, check_resume, trainer_state
from dpo.config import ConfigError, TrainConfig
from dpo.data import IGNORE_INDEX, tokenize_preferences
from dpo.data.formats import normalise
from dpo.data.tokenize import _fingerprint, _PairTokenizer
from tests.conftest import SHARED_DATA, require_shared
from tests.test_data import assistant, messages_dataset, pair, user

QA_TEMPLATE = "Question: {prompt}\n\nAnswer: "


def standard_rows(*rows):
    """Standard-format rows (strings) normalised as the loader does."""
    ds = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])
    return normalise(ds)


def texts(tokenizer, row, side="chosen"):
    """(whole sequence, labelled part) of one tokenized side, decoded."""
    ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
    labelled = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    start = len(ids) - len(labelled)
    assert all(label == IGNORE_INDEX for label in labels[:start])  # one labelled tail
    return tokenizer.decode(ids), tokenizer.decode(labelled)


# -- none: the strings as they are ---------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "tiny_chat_tokenizer"])
def test_none_takes_the_strings_as_they_are(fixture, request):
    """Prompt then response, unchanged (trailing space and newline kept), one BOS (the tokenizer
    adds one itself), one EOS; a chat template, if any, is not used."""
    tokenizer = request.getfixturevalue(fixture)
    ds = standard_rows(("Question: how do I sort?\n\nAnswer: ", "Use sorted().\n", "No idea."))
    (row,), report = tokenize_preferences(ds, tokenizer, max_length=128, chat_template="none")
    assert report.kept == 1
    for side, response in (("chosen", "Use sorted().\n"), ("rejected", "No idea.")):
        whole, labelled = texts(tokenizer, row, side)
        assert whole == "<s>Question: how do I sort?\n\nAnswer: " + response + "<|endoftext|>"
        assert labelled == response + "<|endoftext|>"
        assert row[f"{side}_input_ids"].count(tokenizer.bos_token_id) == 1


def test_none_fills_the_prompt_template(tiny_tokenizer):
    """The template wraps the prompt string; braces inside the prompt stay as they are."""
    ds = standard_rows(("sort {a list}?", "Use sorted().", "No idea."))
    (row,), _ = tokenize_preferences(ds, tiny_tokenizer, max_length=128, chat_template="none",
                                     prompt_template=QA_TEMPLATE)
    whole, labelled = texts(tiny_tokenizer, row)
    assert whole == "<s>Question: sort {a list}?\n\nAnswer: Use sorted().<|endoftext|>"
    assert labelled == "Use sorted().<|endoftext|>"


def test_none_skips_conversations_as_not_raw_text(tiny_tokenizer):
    """A multi-message prompt or response has no raw text: skipped with the reason and what to
    do in the report; strict mode stops on it; single-message rows still tokenize."""
    ds = messages_dataset([
        pair("a", "b", "c"),
        ([user("hi"), assistant("hello"), user("sort?")], [assistant("sorted()")],
         [assistant("no")]),
        ([user("x")], [assistant("y"), user("more"), assistant("z")], [assistant("w")]),
    ])
    rows, report = tokenize_preferences(ds, tiny_tokenizer, max_length=128, chat_template="none")
    assert len(rows) == 1 and report.dropped == {"not_raw_text": 2}
    assert report.examples["not_raw_text"] == [1, 2]
    assert "use auto or plain" in str(report)
    with pytest.raises(ValueError, match=r"row 1: not_raw_text.*strict"):
        tokenize_preferences(ds, tiny_tokenizer, max_length=128, chat_template="none",
                             strict=True)


def test_a_pair_without_prompt_tokens_is_dropped_as_no_prompt_tokens(tiny_tokenizer_json,
                                                                     tiny_tokenizer):
    """A conversation that opens with the assistant, as raw text on a tokenizer that adds no BOS,
    has no prompt token: a causal LM has no logit to score its first response token from, so the
    pair is skipped and counted. With a BOS, the BOS is the prompt and the pair is kept."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    no_bos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny_tokenizer_json),
                                     eos_token="<|endoftext|>")
    ds = normalise(Dataset.from_list([
        {"chosen": [assistant("hi there")], "rejected": [assistant("the dog")]},
        {"chosen": [user("hello"), assistant("hi there")],
         "rejected": [user("hello"), assistant("the dog")]},
    ]))
    assert ds[0]["prompt"] == []
    rows, report = tokenize_preferences(ds, no_bos, max_length=64, chat_template="none")
    assert report.dropped == {"no_prompt_tokens": 1} and report.examples == {
        "no_prompt_tokens": [0]}
    assert "no_prompt_tokens 1 (rows 0)" in str(report) and rows["row_index"] == [1]
    assert rows[0]["chosen_labels"][0] == IGNORE_INDEX
    rows, report = tokenize_preferences(ds, tiny_tokenizer, max_length=64, chat_template="none")
    assert report.kept == 2 and rows[0]["chosen_input_ids"][0] == tiny_tokenizer.bos_token_id
    assert rows[0]["chosen_labels"][0] == IGNORE_INDEX


@pytest.mark.parametrize("template, message", [
    ("Question: {question}", "may hold only {prompt}, found {question}"),
    ("Question: {prompt} {", "found Single '{' encountered"),
    ("Question: {prompt!r}", "found {prompt!r}"),
    ("Question: {prompt[0]}", "found {prompt[0]}"),
    ("Question: ", "has no {prompt}"),
])
def test_bad_prompt_template_is_one_line(tiny_tokenizer, template, message):
    ds = standard_rows(("q", "a", "b"))
    with pytest.raises(ValueError, match=re.escape(message)):
        tokenize_preferences(ds, tiny_tokenizer, max_length=64, chat_template="none",
                             prompt_template=template)


@pytest.mark.parametrize("mode", ["auto", "plain"])
def test_prompt_template_is_refused_outside_none(tiny_chat_tokenizer, mode):
    ds = standard_rows(("q", "a", "b"))
    with pytest.raises(ValueError, match=f"applies to chat_template none.*not {mode}"):
        tokenize_preferences(ds, tiny_chat_tokenizer, max_length=64, chat_template=mode,
                             prompt_template=QA_TEMPLATE)


# -- plain and auto: an HH transcript in a string prompt is not wrapped twice --------------------


HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I sort?\n\nAssistant:"


@pytest.mark.parametrize("prompt", [HH_PROMPT, HH_PROMPT.lstrip()])
def test_plain_renders_a_transcript_prompt_once(tiny_chat_tokenizer, prompt):
    """A standard-format prompt cut from HH-RLHF (also without the leading blank line) with
    responses that carry their own leading space, as TRL's HH datasets store them: rendered as
    the transcript it is, no second Human:/Assistant: layer, one space after the label."""
    ds = standard_rows((prompt, " Use sorted().", " No idea."))
    (row,), _ = tokenize_preferences(ds, tiny_chat_tokenizer, max_length=256,
                                     chat_template="plain")
    whole, labelled = texts(tiny_chat_tokenizer, row)
    assert whole == "<s>" + HH_PROMPT + " Use sorted().<|endoftext|>"
    assert labelled == " Use sorted().<|endoftext|>"


def test_auto_renders_a_transcript_prompt_as_its_turns(tiny_chat_tokenizer):
    """With a chat template the transcript becomes the template's turns, not one user turn
    holding "Human:"/"Assistant:" text."""
    ds = standard_rows((HH_PROMPT, "Use sorted().", "No idea."))
    (row,), _ = tokenize_preferences(ds, tiny_chat_tokenizer, max_length=256)
    expected = tiny_chat_tokenizer.apply_chat_template(
        [user("Hi there"), assistant("Hello!"), user("How do I sort?"),
         assistant("Use sorted().")], tokenize=False)
    whole, labelled = texts(tiny_chat_tokenizer, row)
    assert whole == expected.rstrip() and "Human:" not in whole
    assert labelled == "Use sorted().<|endoftext|>"


def test_a_prompt_that_only_mentions_human_is_left_alone(tiny_tokenizer):
    """Only a whole transcript ending in the "Assistant:" cue is unwrapped."""
    prompt = "What does '\n\nHuman: hi' mean in a transcript?"
    ds = standard_rows((prompt, "A turn.", "No idea."))
    (row,), _ = tokenize_preferences(ds, tiny_tokenizer, max_length=256, chat_template="plain")
    assert texts(tiny_tokenizer, row)[0] == (
        f"<s>\n\nHuman: {prompt}\n\nAssistant: A turn.<|endoftext|>")


def test_auto_without_a_template_is_plain(tiny_tokenizer):
    ds = standard_rows(("hello", "hi there", "go away"))
    auto = tokenize_preferences(ds, tiny_tokenizer, max_length=64)[0][0]
    plain = tokenize_preferences(ds, tiny_tokenizer, max_length=64, chat_template="plain")[0][0]
    assert auto == plain
    assert texts(tiny_tokenizer, auto)[0] == (
        "<s>\n\nHuman: hello\n\nAssistant: hi there<|endoftext|>")


# -- the settings are part of the tokenization's and the run's identity --------------------------


def test_fingerprint_changes_with_the_text_settings(tiny_chat_tokenizer):
    ds = messages_dataset([pair("a", "b", "c")])
    settings = [dict(mode="auto"), dict(mode="plain"), dict(mode="none"),
                dict(mode="none", prompt_template=QA_TEMPLATE),
                dict(mode="none", prompt_template="Q: {prompt}\nA: ")]
    prints = {_fingerprint(ds, _PairTokenizer(tiny_chat_tokenizer, max_length=64,
                                              max_prompt_length=32, **s)) for s in settings}
    assert len(prints) == len(settings)


@pytest.mark.parametrize("saved, change, message", [
    ({}, dict(chat_template="none"), "chat_template 'auto' -> 'none'"),
    (dict(chat_template="none"), dict(prompt_template=QA_TEMPLATE), "prompt_template None -> "),
])
def test_resume_refuses_changed_text_settings(tmp_path, saved, change, message):
    saved = TrainConfig(**saved)
    (tmp_path / STATE_FILE).write_text(json.dumps(trainer_state(saved, 1, global_step=1)))
    with pytest.raises(ConfigError, match=message):
        check_resume(tmp_path, dataclasses.replace(saved, **change), 1)


# -- real tokenizers and the seed's data ---------------------------------------------------------


@pytest.mark.shared
def test_seed_question_answer_data_as_raw_text_on_qwen3(qwen3_tokenizer):
    """The seed's stack-exchange pairs with --chat-template none and the seed's Q/A template:
    each chosen sequence is exactly "Question: <q>\\n\\nAnswer: <response_j>" + EOS, and the
    labels cover "<response_j>" + EOS only (the rejected side likewise)."""
    raw = json.loads(require_shared(SHARED_DATA / "stack_exchange_paired_tiny.json").read_text())
    ds = normalise(Dataset.from_list(raw))
    rows, report = tokenize_preferences(ds, qwen3_tokenizer, max_length=100_000,
                                        chat_template="none", prompt_template=QA_TEMPLATE)
    assert report.kept == len(raw) == 25 and report.truncated == 0
    eos = qwen3_tokenizer.eos_token
    for row in rows:
        source = raw[row["row_index"]]
        for side, response in (("chosen", source["response_j"]),
                               ("rejected", source["response_k"])):
            whole, labelled = texts(qwen3_tokenizer, row, side)
            assert whole == f"Question: {source['question']}\n\nAnswer: {response}{eos}"
            assert labelled == response + eos
            assert row[f"{side}_input_ids"][-1] == qwen3_tokenizer.eos_token_id


@pytest.mark.shared
@pytest.mark.parametrize("name", ["gemma3_tokenizer", "llama3_1_tokenizer"])
def test_raw_text_gets_the_bos_once_on_tokenizers_that_add_it(name, request):
    """Gemma 3 and Llama 3.1 add BOS themselves: a raw-text sequence starts with one BOS, as in
    pretraining, and ends with the EOS (not the chat template's turn end)."""
    tokenizer = request.getfixturevalue(name)
    ds = standard_rows(("how do I sort?", "Use sorted().", "No idea."))
    (row,), _ = tokenize_preferences(ds, tokenizer, max_length=128, chat_template="none",
                                     prompt_template=QA_TEMPLATE)
    ids = row["chosen_input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    whole, labelled = texts(tokenizer, row)
    assert whole == (f"{tokenizer.bos_token}Question: how do I sort?\n\nAnswer: Use sorted()."
                     f"{tokenizer.eos_token}")
    assert labelled == "Use sorted()." + tokenizer.eos_token
