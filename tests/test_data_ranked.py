"""Ranked rows (dpo/data/ranked.py, the `ranked` format of dpo/data/formats.py): both layouts,
bad ranks, tokenizing the extra responses, and the collator's K-slot batches."""
import re

import pytest
import torch
from datasets import Dataset

from dpo.data import IGNORE_INDEX, PreferenceCollator, prepare_tokenizer, tokenize_preferences
from dpo.data.batching import num_pairs
from dpo.data.formats import normalise, resolve_format
from tests.test_data import assistant, user

RANKS = [{"prompt": "Sort?", "responses": ["ok", "best", "worst"], "ranks": [2, 1, 3]},
         {"prompt": "Add?", "responses": ["x", "y"], "ranks": [1, 2]}]


def conversational(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def contents(messages_list) -> list[str]:
    return [messages[0]["content"] for messages in messages_list]


def test_responses_and_ranks_normalise_best_first():
    for rows in (RANKS, [{**r, "prompt": [{"role": "user", "content": r["prompt"]}],
                          "responses": [conversational(t) for t in r["responses"]]}
                         for r in RANKS]):
        ds = Dataset.from_list(rows)
        assert resolve_format(ds.features).name == "ranked"
        out = normalise(ds).to_list()
        assert out[0]["prompt"] == [user("Sort?")]
        assert out[0]["chosen"] == [assistant("best")] and out[0]["rejected"] == [assistant("ok")]
        assert contents(out[0]["more"]) == ["worst"] and out[0]["stages"] == 2
        assert out[1]["more"] == [] and out[1]["stages"] == 1 and out[1]["problem"] == ""


def test_chosen_over_a_list_of_rejected_is_one_stage():
    """Strings, or lists of messages; a conversational `rejected` that is ONE response (a list
    of messages) stays a pair."""
    standard = [{"prompt": "Q?", "chosen": "a", "rejected": ["b", "c", "d"]}]
    chat = [{"prompt": [{"role": "user", "content": "Q?"}], "chosen": conversational("a"),
             "rejected": [conversational(t) for t in "bcd"]}]
    for rows in (standard, chat):
        out = normalise(Dataset.from_list(rows)).to_list()[0]
        assert out["chosen"] == [assistant("a")] and out["rejected"] == [assistant("b")]
        assert contents(out["more"]) == ["c", "d"] and out["stages"] == 1
    pair = Dataset.from_list([{"prompt": [{"role": "user", "content": "Q?"}],
                               "chosen": conversational("a"), "rejected": conversational("b")}])
    assert resolve_format(pair.features).name == "conversational"


@pytest.mark.parametrize("ranks, problem", [
    ([1, 1, 3], "bad_ranks: ranks [1, 1, 3]: 1 is given twice"),
    ([1, 3, 4], "bad_ranks: ranks [1, 3, 4] skip 2"),
    ([0, 1, 2], "bad_ranks: ranks [0, 1, 2]: ranks count from 1 (best), found 0"),
    ([1, 2], "malformed: 3 responses and 2 ranks"),
])
def test_bad_ranks_drop_their_row(ranks, problem):
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "ranks": ranks}]
    assert normalise(Dataset.from_list(rows)).to_list()[0]["problem"] == problem


def test_one_response_and_identical_responses_drop_their_row():
    rows = normalise(Dataset.from_list([
        {"prompt": "p", "responses": ["a"], "ranks": [1]},
        {"prompt": "p", "responses": ["a", "b", "a"], "ranks": [1, 2, 3]}])).to_list()
    assert rows[0]["problem"] == "malformed: a ranking needs 2 or more responses, found 1"
    assert rows[1]["problem"] == "identical: responses[0] and responses[2] are the same"


def test_strict_data_refuses_bad_ranks(tiny_tokenizer):
    rows = normalise(Dataset.from_list([{"prompt": "p", "responses": ["a", "b"],
                                         "ranks": [2, 2]}] + RANKS))
    with pytest.raises(ValueError, match=r"row 0: bad_ranks: ranks \[2, 2\]: 2 is given twice "
                                         r"\(strict mode\)"):
        tokenize_preferences(rows, prepare_tokenizer(tiny_tokenizer), max_length=64,
                             strict=True)


def tokenized(tokenizer, max_length=64, rows=RANKS):
    return tokenize_preferences(normalise(Dataset.from_list(rows)), prepare_tokenizer(tokenizer),
                                max_length=max_length)[0]


@pytest.mark.parametrize("chat", [False, True])
def test_extra_responses_tokenize_after_the_same_prompt(tiny_tokenizer, tiny_chat_tokenizer,
                                                        chat):
    tokenizer = tiny_chat_tokenizer if chat else tiny_tokenizer
    row = tokenized(tokenizer)[0]
    assert row["stages"] == 2 and len(row["more_input_ids"]) == 1
    prompt = row["chosen_labels"].count(IGNORE_INDEX)
    more_ids, more_labels = row["more_input_ids"][0], row["more_labels"][0]
    assert more_ids[:prompt] == row["chosen_input_ids"][:prompt]
    assert more_labels[:prompt] == [IGNORE_INDEX] * prompt and more_labels[prompt:] == \
        more_ids[prompt:]
    # the third response is the pair's rejected response's text in another row: the same ids
    pair = tokenized(tokenizer, rows=[{"prompt": "Sort?", "chosen": "best",
                                       "rejected": "worst"}])[0]
    assert more_ids == pair["rejected_input_ids"]
    lengths = [len(s) for s in (row["chosen_input_ids"], row["rejected_input_ids"], more_ids)]
    assert row["length"] == max(lengths)


def test_truncation_cuts_every_response_alike(tiny_tokenizer):
    long = [{"prompt": "p", "responses": ["a " * 30, "b " * 5, "c " * 40], "ranks": [1, 2, 3]}]
    row = tokenized(tiny_tokenizer, max_length=16, rows=long)[0]
    assert max(len(row["chosen_input_ids"]), len(row["more_input_ids"][0])) == 16
    assert row["length"] == 16


X = IGNORE_INDEX
ROWS = [  # tokenized rankings of 3 and 2 responses
    {"chosen_input_ids": [5, 6, 7], "chosen_labels": [X, 6, 7],
     "rejected_input_ids": [5, 8], "rejected_labels": [X, 8],
     "more_input_ids": [[5, 9, 9, 9]], "more_labels": [[X, 9, 9, 9]], "stages": 2},
    {"chosen_input_ids": [1, 2, 3], "chosen_labels": [X, X, 3],
     "rejected_input_ids": [1, 2, 4], "rejected_labels": [X, X, 4],
     "more_input_ids": [], "more_labels": [], "stages": 1},
]


def test_collator_lays_out_k_slots_and_prompt_only_stand_ins():
    """[rank 1 (B); rank 2 (B); rank 3 (B)]: rows 0..2B−1 are the pair layout; row 1 has no
    third response, so its slot holds its prompt with no label."""
    batch = PreferenceCollator(0)(ROWS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [1, 2, 3, 0], [5, 8, 0, 0],
                                           [1, 2, 4, 0], [5, 9, 9, 9], [1, 2, 0, 0]]
    assert batch["labels"][5].tolist() == [X] * 4
    assert batch["ranking_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["stages"].tolist() == [2, 1] and num_pairs(batch) == 2
    pairs = [{k: v for k, v in row.items() if not k.startswith(("more", "stages"))}
             for row in ROWS]
    assert torch.equal(batch["input_ids"][:4, :3], PreferenceCollator(0)(pairs)["input_ids"])


def test_packed_collator_holds_k_times_b_sequences():
    batch = PreferenceCollator(0, padding_free=True)(ROWS)
    assert batch["packed_sequences"].shape == (6, 3) and num_pairs(batch) == 2
    assert batch["packed_sequences"][:, 2].tolist() == [3, 3, 2, 3, 4, 2]
    assert batch["ranking_mask"].shape == (2, 3)


def test_shared_prompt_collator_segments_all_responses():
    batch = PreferenceCollator(0, share_prompt=True)(ROWS)
    assert batch["shared_pairs"].tolist() == [[0, 0, 1, 2, 1, 3], [1, 0, 2, 1, 1, 0]]
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 9, 9]
    assert num_pairs(batch) == 2


@pytest.mark.parametrize("settings, why", [
    ({"loss_type": ["sigmoid", "sft"]}, "loss_type sigmoid, sft (and rpo_alpha) reads pairs"),
    ({"loss_type": ["kto"]}, "loss_type kto (and rpo_alpha) reads pairs"),
    ({"label_smoothing": 0.1}, "label_smoothing has no ranking form"),
    ({"f_divergence_type": "js_divergence"}, "f_divergence_type js_divergence has no ranking"),
    ({"use_weighting": True}, "use_weighting (WPO) weights pairs"),
    ({"ld_alpha": 0.5}, "ld_alpha (LD-DPO) compares a pair's two lengths"),
    ({"precompute_ref_logps": True}, "precompute_ref_logps stores two log-probs a row"),
])
def test_ranked_rows_refuse_what_reads_pairs(settings, why):
    """The loaders' check once the data turn out ranked (`dpo.train.loaders`): one line."""
    from dpo.config import TrainConfig
    from dpo.train.loaders import check_ranked_run
    with pytest.raises(ValueError, match=f"^its rows are rankings: {re.escape(why)}"):
        check_ranked_run(TrainConfig(model="tiny", dataset="none", **settings))
    check_ranked_run(TrainConfig(model="tiny", dataset="none", ranking_loss="all_pairs"))


def test_a_mixture_of_rankings_and_pairs_trains_as_rankings(tiny_tokenizer):
    """The pairs of a mixture become rankings of two (one stage), so the datasets concatenate
    and batch together; datasets all of one kind stay as they are."""
    from datasets import concatenate_datasets

    from dpo.data.ranked import as_rankings
    rankings = tokenized(tiny_tokenizer)
    pairs = tokenized(tiny_tokenizer, rows=[{"prompt": "Q?", "chosen": "a", "rejected": "b"}])
    assert as_rankings([pairs, pairs]) == [pairs, pairs]
    mixed = concatenate_datasets(as_rankings([rankings, pairs]))
    assert mixed[2]["more_input_ids"] == [] and mixed[2]["stages"] == 1
    batch = PreferenceCollator(0)([mixed[0], mixed[2]])
    assert batch["ranking_mask"].tolist() == [[True, True, True], [True, True, False]]


def test_a_row_over_max_responses_is_named():
    """The row that comes first in the source, even after a draw reordered the rows."""
    from dpo.data.ranked import check_response_count
    rows = normalise(Dataset.from_list(RANKS * 3)).select([5, 4, 3, 2])
    check_response_count(rows, 3)
    with pytest.raises(ValueError, match=r"^row 2 ranks 3 responses, over max_responses 2 "):
        check_response_count(rows, 2)
