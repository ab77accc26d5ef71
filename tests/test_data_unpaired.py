"""Unpaired rows (dpo/data/unpaired.py, the `unpaired` format of dpo/data/formats.py): KTO's
labelled completions, pairs made unpaired, and the collator's mismatched completions."""
import pytest
import torch
from datasets import Dataset, Features, Value

from dpo.data import IGNORE_INDEX, PreferenceCollator, tokenize_preferences
from dpo.data.formats import normalise, resolve_format
from dpo.data.unpaired import as_unpaired, check_both_classes, with_kl_completions
from tests.test_data import assistant, user


def test_standard_and_conversational_unpaired_rows_normalise():
    """TRL's two unpaired forms: strings, and lists of messages."""
    standard = Dataset.from_list([{"prompt": "Sort?", "completion": "sorted(x)", "label": True},
                                  {"prompt": "Sort?", "completion": "No.", "label": False}])
    conversational = Dataset.from_list([
        {"prompt": [{"role": "user", "content": "Sort?"}],
         "completion": [{"role": "assistant", "content": "sorted(x)"}], "label": True},
        {"prompt": [{"role": "user", "content": "Sort?"}],
         "completion": [{"role": "assistant", "content": "No."}], "label": False}])
    for ds in (standard, conversational):
        assert resolve_format(ds.features).name == "unpaired"
        rows = normalise(ds).to_list()
        assert [r["label"] for r in rows] == [True, False]
        assert rows[0]["prompt"] == [user("Sort?")]
        assert rows[0]["chosen"] == rows[0]["rejected"] == [assistant("sorted(x)")]
        assert rows[1]["chosen"] == [assistant("No.")] and rows[1]["problem"] == ""


@pytest.mark.parametrize("labels, found", [([1, 0], "int64"), (["yes", "no"], "string"),
                                           ([1.0, 0.0], "float64")])
def test_labels_that_are_not_booleans_are_refused(labels, found):
    ds = Dataset.from_list([{"prompt": "p", "completion": "c", "label": label}
                            for label in labels])
    with pytest.raises(ValueError, match=f"label must hold booleans .*, found {found}$"):
        normalise(ds)


def test_a_missing_label_drops_its_row():
    features = Features({"prompt": Value("string"), "completion": Value("string"),
                         "label": Value("bool")})
    ds = Dataset.from_list([{"prompt": "p", "completion": "c", "label": None},
                            {"prompt": "p", "completion": "d", "label": True}], features=features)
    rows = normalise(ds).to_list()
    assert rows[0]["problem"] == "missing_field: label is missing" and rows[1]["problem"] == ""


def test_pairs_become_a_desirable_and_an_undesirable_row():
    pairs = normalise(Dataset.from_list([
        {"prompt": "A?", "chosen": "yes", "rejected": "no"},
        {"prompt": "B?", "chosen": "good", "rejected": None}]))  # row 1 has a problem
    rows = as_unpaired(pairs).to_list()
    assert [(r["chosen"][0]["content"] if r["chosen"] else None, r["label"], r["row_index"])
            for r in rows] == [("yes", True, 0), ("no", False, 0), (None, True, 1),
                               (None, False, 1)]
    assert all(r["chosen"] == r["rejected"] for r in rows)
    assert rows[2]["problem"] == rows[3]["problem"] == "missing_field: rejected is missing"
    assert as_unpaired(as_unpaired(pairs)).to_list() == rows  # unpaired rows stay as they are


def test_unpaired_rows_tokenize_with_their_label_and_skip_no_identical_check(tiny_chat_tokenizer):
    ds = normalise(Dataset.from_list([
        {"prompt": "Sort?", "completion": "sorted(x)", "label": True},
        {"prompt": "Sort?", "completion": "No.", "label": False}]))
    tokenized, report = tokenize_preferences(ds, tiny_chat_tokenizer, max_length=64)
    assert report.kept == 2 and tokenized["label"] == [True, False]
    row = tokenized[0]
    assert row["chosen_input_ids"] == row["rejected_input_ids"]


def test_one_class_only_is_refused():
    with pytest.raises(ValueError, match="all 3 rows are desirable .*KTO needs desirable and "
                                         "undesirable"):
        check_both_classes(Dataset.from_dict({"label": [True] * 3}))
    with pytest.raises(ValueError, match="all 2 rows are undesirable"):
        check_both_classes(Dataset.from_dict({"label": [False] * 2}))
    check_both_classes(Dataset.from_dict({"label": [True, False]}))


def _row(prompt, completion, label):
    ids = [*prompt, *completion]
    labels = [IGNORE_INDEX] * len(prompt) + list(completion)
    return {"chosen_input_ids": ids, "chosen_labels": labels, "rejected_input_ids": ids,
            "rejected_labels": labels, "label": label}


def test_mismatched_completions_rotate_by_one_within_the_batch():
    """Row i's prompt with row i − 1's completion (TRL's rotation), cut to max_length."""
    rows = [_row([1, 2], [10, 11, 12], True), _row([3], [20], False),
            _row([4, 5, 6], [30, 31], False)]
    kl = with_kl_completions(rows, max_length=5)
    assert [r["rejected_input_ids"] for r in kl] == [[1, 2, 30, 31], [3, 10, 11, 12],
                                                     [4, 5, 6, 20]]
    assert kl[1]["rejected_labels"] == [IGNORE_INDEX, 10, 11, 12]
    assert with_kl_completions(rows, max_length=4)[1]["rejected_input_ids"] == [3, 10, 11, 12]
    assert with_kl_completions(rows, max_length=3)[1]["rejected_input_ids"] == [3, 10, 11]
    assert [r["chosen_input_ids"] for r in kl] == [r["chosen_input_ids"] for r in rows]


@pytest.mark.parametrize("share_prompt", [False, True])
def test_collator_puts_the_mismatched_completions_in_the_rejected_rows(share_prompt):
    rows = [_row([1, 2], [10, 11], True), _row([3, 4], [20], False)]
    batch = PreferenceCollator(0, share_prompt=share_prompt, max_length=8)(rows)
    assert batch["label"].tolist() == [True, False] and batch["label"].dtype == torch.bool
    if not share_prompt:
        assert batch["input_ids"].tolist() == [[1, 2, 10, 11], [3, 4, 20, 0], [1, 2, 20, 0],
                                               [3, 4, 10, 11]]
