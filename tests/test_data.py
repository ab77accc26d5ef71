"""Tests of the preference-data pipeline: formats, loading, tokenization, validation, batching.

Most tests use the tiny byte-level tokenizer from conftest (no chat template, no pad token, adds
BOS itself), so they run in any clone; the ones marked ``shared`` use the real files and the
Qwen3 tokenizer from ../shared and skip when it is absent.
"""
import gzip
import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from dpo.data import (
    DATA_FORMATS,
    DROP_REASONS,
    IGNORE_INDEX,
    FilterReport,
    LengthGroupedBatchSampler,
    PreferenceCollator,
    default_eval_samples,
    load_preference_splits,
    padding_fraction,
    prepare_tokenizer,
    tokenize_preferences,
)
from dpo.data.formats import normalise, resolve_format
from tests.conftest import SHARED_DATA, require_shared

# Qwen3's generation prompt with thinking on (its default): the think block is the response's.
QWEN3_PROMPT_END = "<|im_start|>assistant\n"
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"


def user(text):
    return {"role": "user", "content": text, "fields": ""}


def assistant(text):
    return {"role": "assistant", "content": text, "fields": ""}


# One pair in every source format; each normalises to the same messages as its EXPECTED entry.
RAW_ROWS = {
    "stack_exchange": {"question": "How do I sort?", "response_j": "Use sorted().",
                       "response_k": "You can't."},
    "standard": {"prompt": "How do I sort?", "chosen": "Use sorted().", "rejected": "You can't."},
    "conversational": {"prompt": [user("How do I sort?")], "chosen": [assistant("Use sorted().")],
                       "rejected": [assistant("You can't.")]},
    "implicit_prompt": {"chosen": "\n\nHuman: How do I sort?\n\nAssistant: Use sorted().",
                        "rejected": "\n\nHuman: How do I sort?\n\nAssistant: You can't."},
    "sharegpt": {"conversations": [{"from": "human", "value": "How do I sort?"}],
                 "chosen": {"from": "gpt", "value": "Use sorted()."},
                 "rejected": {"from": "gpt", "value": "You can't."}},
    # One completion and its label (KTO): normalised as a "pair" of that completion twice.
    "unpaired": {"prompt": "How do I sort?", "completion": "Use sorted().", "label": True},
    # A ranking of N responses (tests/test_data_ranked.py): ranks 1 and 2 are chosen, rejected.
    "ranked": {"prompt": "How do I sort?", "responses": ["You can't.", "Use sorted()."],
               "ranks": [2, 1]},
}
EXPECTED = {"prompt": [user("How do I sort?")], "chosen": [assistant("Use sorted().")],
            "rejected": [assistant("You can't.")]}


def messages_dataset(rows):
    """A dataset in the normalised schema, built by hand as a user might."""
    return Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])


def pair(prompt, chosen, rejected):
    """One hand-made normalised row with a single-turn prompt (none for ``prompt=None``)."""
    return ([] if prompt is None else [user(prompt)], [assistant(chosen)], [assistant(rejected)])


def response_of(ids, labels):
    """The labelled (response) ids of one tokenized sequence."""
    return [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]


def check_sequence(tokenizer, ids, labels, expected_text, response_text, *, turns=1):
    """ids decode to the rendered text; labels cover exactly the response; EOS ends it and
    appears once per turn (a multi-turn response keeps the template's end-of-turn tokens)."""
    assert tokenizer.decode(ids) == expected_text
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:start])
    assert labels[start:] == ids[start:]
    assert tokenizer.decode(ids[start:]) == response_text
    assert ids[start:].count(tokenizer.eos_token_id) == turns and ids[-1] == tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_format", [f for f in DATA_FORMATS
                                         if f not in ("unpaired", "prompts")])
def test_each_format_is_detected_and_normalised(data_format):
    """Every paired format is recognised from its columns and normalises to the same messages
    (unpaired rows: tests/test_data_unpaired.py; prompts: tests/test_data_prompts.py)."""
    ds = Dataset.from_list([RAW_ROWS[data_format]])
    assert resolve_format(ds.features).name == data_format
    row = normalise(ds)[0]
    assert {k: row[k] for k in EXPECTED} == EXPECTED
    assert row["problem"] == "" and row["row_index"] == 0


def test_conversational_without_prompt_splits_at_the_last_shared_assistant_turn():
    """Without a prompt column the shared messages, up to the diverging assistant turn, are it."""
    history = [user("Hi"), assistant("Hello!"), user("Sort a list?")]
    ds = Dataset.from_list([{"chosen": [*history, assistant("sorted(x)")],
                             "rejected": [*history, assistant("No.")]}])
    assert resolve_format(ds.features).name == "conversational"
    row = normalise(ds)[0]
    assert row["prompt"] == history
    assert row["chosen"] == [assistant("sorted(x)")] and row["rejected"] == [assistant("No.")]


def test_responses_that_repeat_the_prompt_lose_the_repeat():
    """UltraFeedback-style rows hold the prompt in its column and again at the start of chosen
    and rejected; the repeat is removed so the prompt is rendered once."""
    prompt = [user("Sort a list?")]
    ds = Dataset.from_list([{"prompt": "Sort a list?", "chosen": [*prompt, assistant("sorted(x)")],
                             "rejected": [*prompt, assistant("No.")]}])
    row = normalise(ds)[0]
    assert row["prompt"] == prompt
    assert row["chosen"] == [assistant("sorted(x)")] and row["rejected"] == [assistant("No.")]


def test_implicit_prompt_keeps_responses_whole_when_an_earlier_turn_differs():
    """HH transcripts that differ before their last turn split at the last shared Assistant."""
    chosen = "\n\nHuman: A?\n\nAssistant: a1\n\nHuman: B?\n\nAssistant: b1"
    rejected = "\n\nHuman: A?\n\nAssistant: a2\n\nHuman: B?\n\nAssistant: b2"
    row = normalise(Dataset.from_list([{"chosen": chosen, "rejected": rejected}]))[0]
    assert row["prompt"] == [user("A?")]
    assert row["chosen"] == [assistant("a1"), user("B?"), assistant("b1")]
    assert row["rejected"] == [assistant("a2"), user("B?"), assistant("b2")]


def test_data_format_override_picks_other_columns():
    """An explicit format reads its own columns even when another format would be detected."""
    ds = Dataset.from_list([{**RAW_ROWS["stack_exchange"], "prompt": "P", "chosen": "C",
                             "rejected": "R"}])
    assert normalise(ds)[0]["prompt"] == [user("How do I sort?")]
    row = normalise(ds, data_format="standard")[0]
    assert row["prompt"] == [user("P")] and row["chosen"] == [assistant("C")]


def test_unknown_columns_and_formats_raise_naming_both():
    """Unknown columns, an unknown format name or a format whose columns lack raise ValueError."""
    ds = Dataset.from_list([{"text": "x", "label": 1}])
    with pytest.raises(ValueError, match=r"\['label', 'text'\].*stack_exchange.*sharegpt"):
        normalise(ds)
    with pytest.raises(ValueError, match="unknown data format 'alpaca'"):
        normalise(Dataset.from_list([RAW_ROWS["standard"]]), data_format="alpaca")
    with pytest.raises(ValueError, match=r"needs columns \['question'.*found \['chosen'"):
        normalise(Dataset.from_list([RAW_ROWS["standard"]]), data_format="stack_exchange")


# ------------------------------------------------------------------------------------------
# Loading and splitting
# ------------------------------------------------------------------------------------------


def standard_rows(n):
    return [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(n)]


def write_rows(path, rows):
    """Write rows in the file type the suffix names."""
    name = path.name
    if name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".parquet"):
        Dataset.from_list(rows).to_parquet(str(path))
    else:
        Dataset.from_list(rows).to_csv(str(path), index=False)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".jsonl.gz", ".parquet", ".csv"])
def test_load_local_file_of_every_type(tmp_path, suffix):
    """Each local file type loads; drawn rows are normalised and keep their source index."""
    path = write_rows(tmp_path / f"pairs{suffix}", standard_rows(20))
    train, eval_ = load_preference_splits(str(path), num_samples=None, eval_samples=None, seed=0)
    assert len(train) == 18 and len(eval_) == 2
    for row in [*train, *eval_]:
        i = row["row_index"]
        assert row["prompt"] == [user(f"question {i}")]
        assert row["rejected"] == [assistant(f"bad {i}")]
    assert sorted([*train["row_index"], *eval_["row_index"]]) == list(range(20))


def test_unsupported_file_type_raises(tmp_path):
    """A file of a type datasets cannot read as a table names the supported suffixes."""
    path = tmp_path / "pairs.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"'\.txt'.*\.jsonl\.gz"):
        load_preference_splits(str(path), num_samples=None, eval_samples=None, seed=0)


def test_held_out_rows_are_drawn_seeded_and_never_train(tmp_path):
    """num_samples rows are drawn by a seeded shuffle; eval rows are held out of them."""
    path = write_rows(tmp_path / "pairs.jsonl", standard_rows(100))

    def split(seed, eval_samples=None):
        train, eval_ = load_preference_splits(
            str(path), num_samples=40, eval_samples=eval_samples, seed=seed
        )
        return list(train["row_index"]), list(eval_["row_index"])

    train, eval_ = split(seed=1)
    assert len(train) == 36 and len(eval_) == 4
    assert not set(train) & set(eval_)
    assert split(seed=1) == (train, eval_)
    other_train, other_eval = split(seed=2)
    assert set(other_train + other_eval) != set(train + eval_)
    # The same drawn rows, held out differently: the draw happens before the hold-out.
    train7, eval7 = split(seed=1, eval_samples=7)
    assert len(eval7) == 7 and set(train7 + eval7) == set(train + eval_)
    assert split(seed=1, eval_samples=0)[1] == []


def test_eval_rows_come_from_the_test_split(tmp_path):
    """A folder with a test split gives eval rows from it, and all drawn train rows train."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_rows(folder / "train.jsonl", standard_rows(30))
    test_rows = [{**row, "prompt": "test " + row["prompt"]} for row in standard_rows(5)]
    write_rows(folder / "test.jsonl", test_rows)
    train, eval_ = load_preference_splits(str(folder), num_samples=20, eval_samples=None, seed=0)
    assert len(train) == 20
    assert len(eval_) == 2  # default_eval_samples(20)
    assert all(row["prompt"][0]["content"].startswith("test ") for row in eval_)
    _, eval_ = load_preference_splits(str(folder), num_samples=20, eval_samples=5, seed=0)
    assert sorted(eval_["row_index"]) == list(range(5))
    with pytest.raises(ValueError, match="eval_samples"):
        load_preference_splits(str(folder), num_samples=20, eval_samples=6, seed=0)


@pytest.mark.parametrize("n, expected", [(1, 0), (2, 1), (19, 1), (25, 2), (1000, 100),
                                         (5000, 200)])
def test_default_eval_samples(n, expected):
    """10% of the drawn rows, at least 1 from two rows on, at most 200."""
    assert default_eval_samples(n) == expected


def test_bad_sample_counts_and_split_raise(tmp_path):
    """Too many rows asked for, a hold-out that leaves nothing, or a missing split raise."""
    path = str(write_rows(tmp_path / "pairs.json", standard_rows(10)))
    with pytest.raises(ValueError, match="num_samples=11 but the split has 10 rows"):
        load_preference_splits(path, num_samples=11, eval_samples=None, seed=0)
    with pytest.raises(ValueError, match="eval_samples=3 must leave training rows"):
        load_preference_splits(path, num_samples=3, eval_samples=3, seed=0)
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_preference_splits(str(tmp_path), num_samples=3, eval_samples=1, seed=0,
                               split="validation")


# ------------------------------------------------------------------------------------------
# Tokenization with the tiny tokenizer (no ../shared needed)
# ------------------------------------------------------------------------------------------


def test_prepare_tokenizer_sets_pad_to_eos_only_when_missing(tiny_tokenizer, tiny_chat_tokenizer):
    """A missing pad token becomes EOS; an existing one is kept; no EOS at all is an error."""
    assert tiny_tokenizer.pad_token is None
    assert prepare_tokenizer(tiny_tokenizer).pad_token_id == tiny_tokenizer.eos_token_id
    tiny_chat_tokenizer.pad_token = "<s>"
    assert prepare_tokenizer(tiny_chat_tokenizer).pad_token == "<s>"
    tiny_chat_tokenizer.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        prepare_tokenizer(tiny_chat_tokenizer)


def test_plain_text_round_trips_with_one_bos_and_one_eos(tiny_tokenizer):
    """Without a chat template pairs render HH-style; BOS (added by this tokenizer) opens the
    prompt once, and each response is labelled exactly, EOS once at its end."""
    ds = messages_dataset([pair("What is the capital of France?", "Paris.", "Lyon, I think.")])
    tokenized, report = tokenize_preferences(ds, tiny_tokenizer, max_length=128)
    assert str(report) == "kept 1 of 1 pairs (0 truncated), dropped none"
    row = tokenized[0]
    prompt = "<s>\n\nHuman: What is the capital of France?\n\nAssistant:"
    for side, content in (("chosen", "Paris."), ("rejected", "Lyon, I think.")):
        ids = row[f"{side}_input_ids"]
        check_sequence(tiny_tokenizer, ids, row[f"{side}_labels"],
                       f"{prompt} {content}<|endoftext|>", f" {content}<|endoftext|>")
        assert ids[0] == tiny_tokenizer.bos_token_id and ids.count(tiny_tokenizer.bos_token_id) == 1
    assert row["length"] == max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))


def test_template_that_writes_bos_gets_no_second_one(tiny_chat_tokenizer):
    """A chat template writing BOS itself, on a tokenizer that adds BOS too: BOS appears once;
    the template's turn-ending EOS is the response's single EOS, and its trailing newline goes."""
    ds = messages_dataset([pair("hello", "hi there", "go away")])
    row = tokenize_preferences(ds, tiny_chat_tokenizer, max_length=128)[0][0]
    ids = row["chosen_input_ids"]
    assert ids.count(tiny_chat_tokenizer.bos_token_id) == 1 and ids[0] == 0
    expected = tiny_chat_tokenizer.apply_chat_template(
        [user("hello"), assistant("hi there")], tokenize=False
    )
    assert expected.endswith("<|endoftext|>\n")
    check_sequence(tiny_chat_tokenizer, ids, row["chosen_labels"], expected.rstrip(),
                   "hi there<|endoftext|>")


def test_chat_template_plain_renders_plain_text(tiny_chat_tokenizer):
    """chat_template="plain" ignores the tokenizer's template."""
    ds = messages_dataset([pair("hello", "hi there", "go away")])
    row = tokenize_preferences(ds, tiny_chat_tokenizer, max_length=128,
                               chat_template="plain")[0][0]
    text = tiny_chat_tokenizer.decode(row["chosen_input_ids"])
    assert text == "<s>\n\nHuman: hello\n\nAssistant: hi there<|endoftext|>"


def test_empty_prompt_is_allowed(tiny_chat_tokenizer):
    """A pair without prompt (empty prompt list) tokenizes: only the template's header is
    unlabelled."""
    ds = messages_dataset([pair(None, "hi there", "go away")])
    row = tokenize_preferences(ds, tiny_chat_tokenizer, max_length=128)[0][0]
    check_sequence(tiny_chat_tokenizer, row["chosen_input_ids"], row["chosen_labels"],
                   "<s><|assistant|>\nhi there<|endoftext|>", "hi there<|endoftext|>")


def test_num_proc_2_gives_the_same_rows(tiny_tokenizer):
    """Normalising and tokenizing in two processes gives exactly the single-process result."""
    raw = Dataset.from_list([{"question": f"question number {i}" * (i % 7 + 1),
                              "response_j": f"good answer {i}", "response_k": f"bad answer {i}"}
                             for i in range(40)])
    results = []
    for num_proc in (None, 2):
        ds = normalise(raw, num_proc=num_proc)
        tokenized, report = tokenize_preferences(ds, tiny_tokenizer, max_length=48,
                                                 num_proc=num_proc)
        results.append((tokenized.to_list(), str(report)))
    assert results[0] == results[1]
    assert "truncated" in results[0][1] and len(results[0][0]) == 40


# ------------------------------------------------------------------------------------------
# Truncation
# ------------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(f"turn {i}: the quick brown fox jumps over the lazy dog." for i in range(12))
LONG_ANSWER = "The capital of France is Paris, " * 8


def untruncated(tokenizer, rows):
    """Tokenize with room to spare: the reference the truncated rows are cut from."""
    return tokenize_preferences(messages_dataset(rows), tokenizer, max_length=10_000)[0]


def prompt_length(labels):
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def test_pair_that_fits_is_not_truncated_even_with_a_long_prompt(tiny_tokenizer):
    """max_prompt_length only applies when prompt + response exceed max_length."""
    rows = [pair(LONG_PROMPT, "Paris.", "Lyon.")]
    full = untruncated(tiny_tokenizer, rows)[0]
    n_prompt = prompt_length(full["chosen_labels"])
    assert n_prompt > 20
    tokenized, report = tokenize_preferences(messages_dataset(rows), tiny_tokenizer,
                                             max_length=full["length"], max_prompt_length=20)
    assert report.truncated == 0 and tokenized[0] == full


def test_prompt_keeps_its_end_and_responses_their_start(tiny_tokenizer):
    """A long pair keeps BOS + the prompt's last tokens (max_prompt_length in all), then each
    response's first tokens up to max_length; a cut response has no EOS, a short one keeps it."""
    rows = [pair(LONG_PROMPT, LONG_ANSWER, "Lyon.")]
    full = untruncated(tiny_tokenizer, rows)[0]
    n_full_prompt = prompt_length(full["chosen_labels"])
    tokenized, report = tokenize_preferences(messages_dataset(rows), tiny_tokenizer,
                                             max_length=64)  # max_prompt_length = 32
    row = tokenized[0]
    assert report.truncated == 1 and report.kept == 1
    n_prompt = prompt_length(row["chosen_labels"])
    assert n_prompt == 32
    prompt = row["chosen_input_ids"][:n_prompt]
    assert prompt == [tiny_tokenizer.bos_token_id] + full["chosen_input_ids"][
        n_full_prompt - 31: n_full_prompt]
    assert len(row["chosen_input_ids"]) == 64
    assert row["chosen_input_ids"][n_prompt:] == full["chosen_input_ids"][
        n_full_prompt: n_full_prompt + 32]
    assert tiny_tokenizer.eos_token_id not in row["chosen_labels"]
    # The short rejected response fits whole, EOS included.
    assert row["rejected_input_ids"][n_prompt:] == full["rejected_input_ids"][n_full_prompt:]
    assert row["rejected_input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert row["length"] == 64


def test_response_budget_counts_the_eos(tiny_tokenizer):
    """A response exactly one token too long for its budget loses its EOS, not a text token."""
    rows = [pair("hi", "The quick brown fox", "no")]
    full = untruncated(tiny_tokenizer, rows)[0]
    max_length = len(full["chosen_input_ids"]) - 1
    row = tokenize_preferences(messages_dataset(rows), tiny_tokenizer, max_length=max_length,
                               max_prompt_length=max_length)[0][0]
    assert row["chosen_input_ids"] == full["chosen_input_ids"][:-1]
    assert full["chosen_input_ids"][-1] == tiny_tokenizer.eos_token_id


def test_row_left_without_response_is_dropped_and_counted(tiny_tokenizer):
    """With max_prompt_length == max_length a long prompt leaves nothing of a response: that row
    is dropped as truncated_away; a short row in the same data is kept."""
    ds = messages_dataset([pair("hi", "hello", "go"), pair(LONG_PROMPT, "Paris.", "Lyon.")])
    tokenized, report = tokenize_preferences(ds, tiny_tokenizer, max_length=40,
                                             max_prompt_length=40)
    assert report.kept == 1 and report.dropped == {"truncated_away": 1}
    assert report.examples == {"truncated_away": [1]} and tokenized["row_index"] == [0]


@pytest.mark.parametrize("max_prompt_length", [0, 65])
def test_max_prompt_length_out_of_range_raises(tiny_tokenizer, max_prompt_length):
    """max_prompt_length must lie in 1..max_length."""
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_preferences(messages_dataset([pair("a", "b", "c")]), tiny_tokenizer,
                             max_length=64, max_prompt_length=max_prompt_length)


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------

# A template that writes each message's length before its content: a rendering of the prompt
# alone cannot know what comes before the response's content.
LENGTH_TEMPLATE = (
    "{% for m in messages %}|{{ m['role'] }} ({{ m['content'] | length }}): {{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}|assistant: {% endif %}"
)


def test_every_drop_reason_is_counted_with_row_indices(tiny_tokenizer, tmp_path):
    """Each kind of bad row is skipped and counted under its reason, with its source row."""
    good = {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go")]}
    rows = [
        good,
        {**good, "chosen": None},  # missing_field
        {**good, "rejected": [{"role": "assistant", "content": None}]},  # missing_field
        {**good, "prompt": [{"role": "narrator", "content": "Once"}]},  # malformed
        {**good, "chosen": [assistant("   ")]},  # empty
        {**good, "rejected": []},  # empty
        {**good, "rejected": good["chosen"]},  # identical
        {**good, "prompt": [user(LONG_PROMPT)]},  # truncated_away
        good,
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train, _ = load_preference_splits(str(path), num_samples=None, eval_samples=0, seed=0)
    tokenized, report = tokenize_preferences(train, tiny_tokenizer, max_length=40,
                                             max_prompt_length=40)
    assert report.dropped == {"missing_field": 2, "malformed": 1, "empty": 2, "identical": 1,
                              "truncated_away": 1}
    assert report.examples == {"missing_field": [1, 2], "malformed": [3], "empty": [4, 5],
                               "identical": [6], "truncated_away": [7]}
    assert sorted(tokenized["row_index"]) == [0, 8] and (report.kept, report.total) == (2, 9)
    line = str(report)
    assert "\n" not in line and line.startswith("kept 2 of 9 pairs")
    assert "missing_field 2 (rows 1, 2)" in line and "truncated_away 1 (rows 7)" in line


def test_not_a_string_is_counted(tiny_tokenizer):
    """A number where text belongs (say, a CSV column read as integers) is not_a_string."""
    raw = Dataset.from_dict({"prompt": ["a", "b", "c"], "chosen": [1, 2, 3],
                             "rejected": ["x", "y", "z"]})
    with pytest.raises(ValueError, match="not_a_string 3"):
        tokenize_preferences(normalise(raw, data_format="standard"), tiny_tokenizer,
                             max_length=32)


def test_template_mismatch_is_counted(tiny_tokenizer):
    """A template that renders the prompt differently once a response follows drops the row."""
    tiny_tokenizer.chat_template = LENGTH_TEMPLATE
    ds = messages_dataset([pair("a", "b", "c"), pair("d", "e", "f")])
    with pytest.raises(ValueError, match=r"template_mismatch 2 \(rows 0, 1; \"no rendering of"):
        tokenize_preferences(ds, tiny_tokenizer, max_length=32)


def test_strict_mode_raises_on_the_first_bad_row(tiny_tokenizer):
    """strict=True names the first bad row and its reason instead of skipping it."""
    ds = messages_dataset([pair("a", "b", "c"), pair("d", "e", "e"), pair("g", "", "i")])
    tokenized, report = tokenize_preferences(ds, tiny_tokenizer, max_length=32)
    assert report.dropped == {"empty": 1, "identical": 1}
    with pytest.raises(ValueError, match=r"row 1: identical: .*strict"):
        tokenize_preferences(ds, tiny_tokenizer, max_length=32, strict=True)


def test_dataset_that_filters_to_nothing_raises(tiny_tokenizer):
    """When every row is bad the error says so and carries the report."""
    ds = messages_dataset([pair("a", "b", "b"), pair("c", "d", "d")])
    with pytest.raises(ValueError, match=r"no usable preference pairs.*identical 2 \(rows 0, 1\)"):
        tokenize_preferences(ds, tiny_tokenizer, max_length=32)


def test_report_lists_a_few_rows_per_reason():
    """The report keeps the first MAX_EXAMPLES rows of a reason and says there are more."""
    problems = ["", *["identical: same"] * 7, "empty: chosen[0] is empty"]
    report = FilterReport.from_rows(problems, list(range(100, 109)), [False] * 9)
    assert report.examples["identical"] == [101, 102, 103, 104, 105]
    assert str(report) == ("kept 1 of 9 pairs (0 truncated), dropped 8: empty 1 (rows 108); "
                           "identical 7 (rows 101, 102, 103, 104, 105, ...)")
    assert set(report.dropped) <= set(DROP_REASONS)


# ------------------------------------------------------------------------------------------
# Real data and the Qwen3 tokenizer (../shared)
# ------------------------------------------------------------------------------------------


def check_qwen3_rows(tokenizer, normalised, tokenized):
    """Every kept row round-trips to the Qwen3 rendering of its messages. The prompt ends with
    the generation prompt (thinking on, the template's default), so a single-message response's
    labels decode to the empty think block the template writes, the content and one EOS."""
    rows = {row["row_index"]: row for row in normalised}
    for row in tokenized:
        source = rows[row["row_index"]]
        single = len(source["chosen"]) == len(source["rejected"]) == 1
        for side in ("chosen", "rejected"):
            rendered = tokenizer.apply_chat_template([*source["prompt"], *source[side]],
                                                     tokenize=False)
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            prompt = tokenizer.decode(ids[: prompt_length(labels)])
            assert prompt.endswith(QWEN3_PROMPT_END)
            response = rendered.rstrip()[len(prompt):]
            if single:  # Qwen3 strips leading newlines from the last turn's content
                assert response == \
                    QWEN3_EMPTY_THINK + source[side][0]["content"].lstrip("\n") + "<|im_end|>"
            check_sequence(tokenizer, ids, labels, rendered.rstrip(), response,
                           turns=len(source[side]))


@pytest.mark.shared
@pytest.mark.parametrize("data_format", [f for f in DATA_FORMATS if f != "prompts"])
def test_qwen3_every_format_on_self_made_rows(qwen3_tokenizer, data_format):
    """Each format, rendered with the Qwen3 chat template: exact round trip and labels."""
    ds = normalise(Dataset.from_list([RAW_ROWS[data_format]]))
    tokenized, report = tokenize_preferences(ds, qwen3_tokenizer, max_length=128)
    assert report.kept == 1 and qwen3_tokenizer.bos_token is None
    check_qwen3_rows(qwen3_tokenizer, ds, tokenized)


@pytest.mark.shared
@pytest.mark.parametrize("name, data_format, num_samples", [
    ("stack_exchange_paired_tiny.json", "stack_exchange", None),
    ("hh_rlhf_helpful_base_test.jsonl.gz", "implicit_prompt", 150),
    ("hh_rlhf_harmless_base_test.jsonl.gz", "implicit_prompt", 150),
    ("llamafactory_dpo_en_demo.json", "sharegpt", 120),
])
def test_qwen3_real_files_round_trip(qwen3_tokenizer, name, data_format, num_samples):
    """The real files load in their detected format and every row round-trips untruncated."""
    path = require_shared(SHARED_DATA / name)
    train, _ = load_preference_splits(str(path), num_samples=num_samples, eval_samples=0, seed=0)
    assert resolve_format(_source_features(path)).name == data_format
    tokenized, report = tokenize_preferences(train, qwen3_tokenizer, max_length=32_768)
    assert report.truncated == 0 and report.kept >= len(train) - 2
    check_qwen3_rows(qwen3_tokenizer, train, tokenized)


def _source_features(path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train").features


@pytest.mark.shared
def test_qwen3_all_25_stack_exchange_rows_survive_max_length_256(qwen3_tokenizer):
    """Issue 3, item 4: at max_length 256 most prompts are too long, yet all 25 rows survive,
    each with a prompt that keeps its end (the assistant header) and some response."""
    path = require_shared(SHARED_DATA / "stack_exchange_paired_tiny.json")
    train, _ = load_preference_splits(str(path), num_samples=None, eval_samples=0, seed=0)
    tokenized, report = tokenize_preferences(train, qwen3_tokenizer, max_length=256)
    assert report.kept == 25 and report.dropped == {}
    assert report.truncated > 12  # most rows needed cutting
    full = {row["row_index"]: row for row in
            tokenize_preferences(train, qwen3_tokenizer, max_length=100_000)[0]}
    for row in tokenized:
        whole = full[row["row_index"]]
        if whole["length"] <= 256:  # a pair that fits is left as it is
            assert row == whole
            continue
        n_whole = prompt_length(whole["chosen_labels"])
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            n_prompt = prompt_length(labels)
            assert len(ids) <= 256 and n_prompt == min(128, n_whole) and len(ids) > n_prompt
            assert ids[:n_prompt] == whole[f"{side}_input_ids"][n_whole - n_prompt: n_whole]
            assert qwen3_tokenizer.decode(ids[:n_prompt]).endswith(QWEN3_PROMPT_END)


@pytest.mark.shared
def test_qwen3_response_with_its_own_think_block_or_several_turns(qwen3_tokenizer):
    """A response with reasoning and a multi-turn response: the generation prompt is the
    prompt and the rest is labelled; the round trip still holds."""
    prompt = [user("2+2?")]
    thinking = [assistant("<think>\nadd them\n</think>\n\n4")]
    several = [assistant("4"), user("and 3+3?"), assistant("6")]
    ds = messages_dataset([(prompt, thinking, [assistant("5")]), (prompt, several, thinking)])
    tokenized, _ = tokenize_preferences(ds, qwen3_tokenizer, max_length=256)
    for row, source in zip(tokenized, ds):
        ids, labels = row["chosen_input_ids"], row["chosen_labels"]
        rendered = qwen3_tokenizer.apply_chat_template([*prompt, *source["chosen"]],
                                                       tokenize=False).rstrip()
        assert qwen3_tokenizer.decode(ids) == rendered
        assert qwen3_tokenizer.decode(ids[: prompt_length(labels)]).endswith("assistant\n")
    assert qwen3_tokenizer.decode(response_of(tokenized[0]["chosen_input_ids"],
                                              tokenized[0]["chosen_labels"])) \
        == "<think>\nadd them\n</think>\n\n4<|im_end|>"


@pytest.mark.shared
def test_hh_rlhf_bad_rows_are_found(tiny_tokenizer):
    """The real HH-RLHF helpful test file has 2 identical pairs and 4 empty responses; all are
    skipped with their reasons, the other 2348 rows are kept (plain-text rendering)."""
    path = require_shared(SHARED_DATA / "hh_rlhf_helpful_base_test.jsonl.gz")
    train, _ = load_preference_splits(str(path), num_samples=None, eval_samples=0, seed=0)
    _, report = tokenize_preferences(train, tiny_tokenizer, max_length=100_000)
    assert report.dropped == {"empty": 4, "identical": 2} and report.kept == 2348


# ------------------------------------------------------------------------------------------
# Collator
# ------------------------------------------------------------------------------------------


def test_collator_pads_chosen_then_rejected_pair_by_pair(tiny_tokenizer):
    """(2B, T) long tensors, right-padded; rows i and B+i are one pair; labels -100 on prompt
    and padding; the attention mask counts the real tokens."""
    prepare_tokenizer(tiny_tokenizer)
    ds = messages_dataset([pair("hi", "hello there", "no"), pair(LONG_PROMPT, "Paris.", "x"),
                           pair("sort?", "sorted(x)", "I don't know how to sort things.")])
    rows = list(tokenize_preferences(ds, tiny_tokenizer, max_length=512)[0])
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)(rows)
    width = max(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows)
    for name in ("input_ids", "attention_mask", "labels"):
        assert batch[name].shape == (6, width) and batch[name].dtype == torch.long
    for i, row in enumerate(rows):
        for j, side in ((i, "chosen"), (3 + i, "rejected")):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            n = len(ids)
            assert batch["input_ids"][j, :n].tolist() == ids
            assert batch["labels"][j, :n].tolist() == labels
            assert batch["attention_mask"][j].tolist() == [1] * n + [0] * (width - n)
            assert (batch["labels"][j, n:] == IGNORE_INDEX).all()
            assert (batch["input_ids"][j, n:] == tiny_tokenizer.pad_token_id).all()
        n_prompt = prompt_length(row["chosen_labels"])
        assert torch.equal(batch["input_ids"][i, :n_prompt], batch["input_ids"][3 + i, :n_prompt])
    real = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    assert batch["attention_mask"].sum().item() == real
    assert padding_fraction(batch) == pytest.approx(1 - real / (6 * width))


def test_collator_pad_to_multiple_of_and_missing_pad_id():
    """pad_to_multiple_of rounds T up; a None pad id asks for prepare_tokenizer."""
    rows = [{"chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7],
             "rejected_input_ids": [5, 8], "rejected_labels": [-100, 8]}]
    batch = PreferenceCollator(0, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [5, 8, 0, 0, 0, 0, 0, 0]]
    assert padding_fraction(batch) == pytest.approx(11 / 16)
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        PreferenceCollator(None)


def _toy_pairs():
    """Two pairs of sequences of 3, 5 (chosen) and 2, 4 (rejected) tokens, prompts of 1 and 2."""
    def side(ids, prompt):
        return ids, [IGNORE_INDEX] * prompt + ids[prompt:]
    rows = []
    for (c, r, p) in (([5, 6, 7], [5, 8], 1), ([9, 10, 11, 12, 13], [9, 10, 14, 15], 2)):
        (ci, cl), (ri, rl) = side(c, p), side(r, p)
        rows.append({"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri,
                     "rejected_labels": rl, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0})
    return rows


def test_padding_free_collator_packs_one_row():
    """The 2B sequences end to end in [chosen; rejected] order, position ids restarting at each,
    the first label of each sequence -100 (none predicted across a boundary), no padding; each
    sequence's (row, start, length) in packed_sequences; pair columns pass through."""
    batch = PreferenceCollator(0, padding_free=True)(_toy_pairs())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10, 11, 12, 13, 5, 8, 9, 10, 14, 15]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, 6, 7, x, x, 11, 12, 13, x, 8, x, x, 14, 15]]
    assert batch["attention_mask"].tolist() == [[1] * 14]
    assert batch["packed_sequences"].tolist() == [[0, 0, 3], [0, 3, 5], [0, 8, 2], [0, 10, 4]]
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -1.0]
    assert padding_fraction(batch) == 0.0


def test_padding_free_collator_bounds_its_rows():
    """At most max_packed_tokens per row, first fit longest first; a shorter row ends in
    padding, with attention mask 0 and label -100, at positions counted modulo the longest
    sequence (none beyond a sequence's own); a sequence longer than a row is refused."""
    batch = PreferenceCollator(0, padding_free=True, max_packed_tokens=7)(_toy_pairs())
    # 5 and 2 fill row 0; 4 and 3 row 1
    assert batch["packed_sequences"].tolist() == [[1, 0, 3], [0, 0, 5], [0, 5, 2], [1, 3, 4]]
    assert batch["input_ids"].tolist() == [[9, 10, 11, 12, 13, 5, 8],
                                           [5, 6, 7, 9, 10, 14, 15]]
    batch = PreferenceCollator(0, padding_free=True, max_packed_tokens=6)(_toy_pairs())
    # 5 alone; 4 then 2 (which fits beside 4, not 5); 3 alone
    assert batch["packed_sequences"].tolist() == [[2, 0, 3], [0, 0, 5], [1, 0, 2], [1, 2, 4]]
    assert batch["input_ids"].shape == (3, 6)
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["attention_mask"][2].tolist() == [1, 1, 1, 0, 0, 0]
    assert (batch["labels"][2, 3:] == IGNORE_INDEX).all()
    assert padding_fraction(batch) == pytest.approx(4 / 18)
    with pytest.raises(ValueError, match="a sequence of 5 tokens does not fit a packed row"):
        PreferenceCollator(0, padding_free=True, max_packed_tokens=4)(_toy_pairs())


# ------------------------------------------------------------------------------------------
# Length-grouped batch sampler
# ------------------------------------------------------------------------------------------

LENGTHS = np.random.default_rng(0).integers(10, 500, size=203).tolist()


def micro_batches(lengths=LENGTHS, epoch=0, **kwargs):
    settings = {"micro_batch_size": 4, "global_batch_size": 16, "seed": 3, **kwargs}
    sampler = LengthGroupedBatchSampler(lengths, **settings)
    sampler.set_epoch(epoch)
    return list(sampler), sampler


def global_batches(micro, per_global):
    return [sum(micro[k: k + per_global], []) for k in range(0, len(micro), per_global)]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_sampler_sees_every_pair_and_tops_up_the_tail(group_by_length):
    """Each epoch covers every pair; the last global batch is filled with the epoch's first
    pairs, so all global batches are full and only the fill is seen twice."""
    micro, sampler = micro_batches(group_by_length=group_by_length)
    assert len(micro) == len(sampler) == 13 * 4  # ceil(203 / 16) global batches of 4 micro
    assert all(len(batch) == 4 for batch in micro)
    flat = sum(micro, [])
    assert set(flat) == set(range(203))
    counts = np.bincount(flat)
    assert counts.max() == 2 and (counts == 2).sum() == 13 * 16 - 203


@pytest.mark.parametrize("group_by_length", [True, False])
def test_global_batches_do_not_depend_on_micro_batch_size(group_by_length):
    """The pairs of each optimizer step, in order, are the same for any micro-batch size (and
    so for any number of processes × accumulation steps making up the global batch)."""
    reference = None
    for micro_batch_size in (1, 2, 4, 8, 16):
        micro, sampler = micro_batches(micro_batch_size=micro_batch_size,
                                       group_by_length=group_by_length)
        batches = global_batches(micro, 16 // micro_batch_size)
        assert batches == sampler.global_batches()
        reference = reference or batches
        assert batches == reference


def test_sampler_is_seeded_per_epoch():
    """Same seed and epoch: same order (an exact resume replays it); another epoch or seed
    reshuffles."""
    first, _ = micro_batches(epoch=1)
    assert micro_batches(epoch=1)[0] == first
    assert micro_batches(epoch=2)[0] != first
    assert micro_batches(epoch=1, seed=4)[0] != first


def test_grouping_sorts_within_global_batches_and_cuts_padding():
    """Grouped global batches are sorted longest first, so micro-batches hold similar lengths
    and pad far less than a plain shuffle, which leaves lengths unsorted."""
    lengths = np.asarray(LENGTHS)

    def padding(micro):
        return sum(lengths[b].max() * len(b) - lengths[b].sum() for b in micro)

    grouped, _ = micro_batches(mega_batch_mult=4)
    plain, _ = micro_batches(group_by_length=False)
    for batch in global_batches(grouped, 4):
        assert list(lengths[batch]) == sorted(lengths[batch], reverse=True)
    assert any(list(lengths[b]) != sorted(lengths[b], reverse=True)
               for b in global_batches(plain, 4))
    assert padding(grouped) < 0.5 * padding(plain)


def test_sampler_rejects_bad_sizes():
    """A global batch that is not a multiple of the micro-batch, or no pairs, raise."""
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        LengthGroupedBatchSampler([1, 2, 3], micro_batch_size=3, global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="lengths is empty"):
        LengthGroupedBatchSampler([], micro_batch_size=1, global_batch_size=1, seed=0)


def test_dataloader_end_to_end(tiny_tokenizer):
    """DataLoader(batch_sampler=..., collate_fn=...) over tokenized rows yields (2m, T) batches
    whose halves are the pairs the sampler chose."""
    prepare_tokenizer(tiny_tokenizer)
    ds = messages_dataset([pair(f"question {i} " * (i + 1), f"answer {i}", f"no {i}")
                           for i in range(10)])
    tokenized, _ = tokenize_preferences(ds, tiny_tokenizer, max_length=256)
    sampler = LengthGroupedBatchSampler(tokenized["length"], micro_batch_size=2,
                                        global_batch_size=4, seed=0)
    loader = DataLoader(tokenized, batch_sampler=sampler,
                        collate_fn=PreferenceCollator(tiny_tokenizer.pad_token_id))
    batches = list(loader)
    assert len(batches) == len(sampler) == 6
    for batch, indices in zip(batches, sampler):
        assert batch["input_ids"].shape[0] == 4
        for k, index in enumerate(indices):
            chosen = tokenized[index]["chosen_input_ids"]
            assert batch["input_ids"][k, : len(chosen)].tolist() == chosen
