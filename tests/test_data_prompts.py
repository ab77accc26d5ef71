"""Prompt-only rows (the `prompts` format of dpo/data/formats.py): detected, normalised with
empty responses, loaded with every feature of load_preference_splits, and refused by train.py's
loaders with one line (online DPO answers them: dpo/online/prompts.py)."""
import json

import pytest
from datasets import Dataset

from dpo.config import ConfigError, TrainConfig
from dpo.data import DATA_FORMATS, load_preference_splits
from dpo.data.formats import holds_prompts_only, normalise, resolve_format


def user(text):
    return {"role": "user", "content": text, "fields": ""}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prompt_rows(n, prefix="question"):
    return [{"prompt": f"{prefix} {i}?"} for i in range(n)]


@pytest.mark.parametrize("prompt", ["How do I sort?", [user("How do I sort?")]])
def test_prompt_alone_is_detected_and_normalised_without_responses(prompt):
    ds = Dataset.from_list([{"prompt": prompt}])
    assert "prompts" in DATA_FORMATS and resolve_format(ds.features).name == "prompts"
    assert normalise(ds)[0] == {"prompt": [user("How do I sort?")], "chosen": [], "rejected": [],
                                "tools": "", "chat_template_kwargs": "", "row_index": 0,
                                "problem": ""}


def test_a_row_keeps_its_tools_template_options_and_message_fields():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    system = {"role": "system", "content": "Be brief.", "name": "sys"}
    ds = Dataset.from_list([{"prompt": [system, {"role": "user", "content": "Hi"}],
                             "tools": json.dumps(tools),
                             "chat_template_kwargs": {"enable_thinking": False}}])
    row = normalise(ds)[0]
    assert row["prompt"] == [{"role": "system", "content": "Be brief.",
                              "fields": '{"name": "sys"}'}, user("Hi")]
    assert json.loads(row["tools"]) == tools
    assert json.loads(row["chat_template_kwargs"]) == {"enable_thinking": False}
    assert row["chosen"] == row["rejected"] == [] and row["problem"] == ""


@pytest.mark.parametrize("columns", [["prompt", "completion"], ["prompt", "responses"],
                                     ["prompt", "chosen"], ["question"]])
def test_a_prompt_beside_any_response_column_is_not_prompt_only(columns):
    """A prompt with a response column (but not a whole format) is no format: it raises."""
    ds = Dataset.from_list([{name: "x" for name in columns}])
    with pytest.raises(ValueError, match=r"cannot tell.*prompt alone \(prompts\)"):
        resolve_format(ds.features)


def test_data_format_prompts_takes_the_prompts_of_pairs():
    ds = Dataset.from_list([{"prompt": "P", "chosen": "C", "rejected": "R"}])
    assert resolve_format(ds.features).name == "standard"
    row = normalise(ds, data_format="prompts")[0]
    assert row["prompt"] == [user("P")] and row["chosen"] == row["rejected"] == []
    with pytest.raises(ValueError, match=r"'prompts' needs columns \['prompt'\]"):
        normalise(Dataset.from_list([{"question": "q"}]), data_format="prompts")
    assert TrainConfig(data_format=["prompts"]).data_format == ["prompts"]


@pytest.mark.parametrize("prompt, problem", [
    (None, "missing_field: prompt is missing"),
    ("", "empty: prompt[0] is empty"),
    ("  \n", "empty: prompt[0] is empty"),
    ([], "empty: prompt has no message"),
    ([{"role": "user", "content": None}], "missing_field: prompt[0] has no content"),
    ([{"role": "robot", "content": "Hi"}], "malformed: prompt[0] has unknown role 'robot'"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": " "}],
     "empty: prompt[1] is empty"),
])
def test_bad_prompts_get_the_usual_problem_reasons(prompt, problem):
    ds = Dataset.from_list([{"prompt": prompt, "other": 1}])
    row = normalise(ds, data_format="prompts")[0]
    assert row["problem"] == problem
    assert row["prompt"] == row["chosen"] == row["rejected"] == []


def test_a_number_is_not_a_string():
    row = normalise(Dataset.from_list([{"prompt": 7}]))[0]
    assert row["problem"] == "not_a_string: prompt is a int, expected a string or a list of " \
                             "messages"


def test_holds_prompts_only():
    prompts = normalise(Dataset.from_list(prompt_rows(3) + [{"prompt": None}]))
    assert holds_prompts_only(prompts)
    assert holds_prompts_only(prompts.select([3, 1]))
    assert not holds_prompts_only(prompts.select([3]))  # no usable row: nothing to say it of
    assert not holds_prompts_only(prompts.select([]))
    pairs = normalise(Dataset.from_list([{"prompt": "P", "chosen": "C", "rejected": "R"}]))
    assert not holds_prompts_only(pairs)


def test_loading_draws_holds_out_and_streams_prompts(tmp_path):
    path = str(write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(30)))
    train, evals = load_preference_splits(path, num_samples=20, eval_samples=4, seed=3)
    assert (len(train), len(evals)) == (16, 4)
    assert not set(train["row_index"]) & set(evals["row_index"])
    for row in [*train, *evals]:
        assert row["prompt"] == [user(f"question {row['row_index']}?")]
        assert row["chosen"] == row["rejected"] == [] and row["problem"] == ""
    assert load_preference_splits(path, num_samples=20, eval_samples=4, seed=3)[0]["row_index"] \
        == train["row_index"]
    streamed, held = load_preference_splits(path, num_samples=10, eval_samples=2, seed=0,
                                            streaming=True)
    assert (len(streamed), len(held)) == (8, 2) and holds_prompts_only(streamed)


def test_eval_prompts_come_from_the_test_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", prompt_rows(10))
    write_jsonl(tmp_path / "test.jsonl", prompt_rows(3, prefix="test"))
    train, evals = load_preference_splits(str(tmp_path), num_samples=None, eval_samples=None,
                                          seed=0)
    assert len(train) == 10 and len(evals) == 1  # default_eval_samples(10)
    assert evals[0]["prompt"] == [user(f"test {evals[0]['row_index']}?")]


def test_train_py_refuses_prompts_with_one_line(tmp_path, tiny_tokenizer):
    """train.py needs pairs: prompts stop it while the datasets are built, with one line that
    points at online DPO (eval rows are read in the train rows' format, so they are prompts
    too)."""
    from accelerate import Accelerator

    from dpo.train.loaders import build_datasets

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    cfg = TrainConfig(dataset=str(prompts), num_samples=None, eval_samples=2, max_length=64)
    with pytest.raises(ConfigError) as raised:
        build_datasets(cfg, Accelerator(cpu=True), tiny_tokenizer)
    assert str(raised.value) == (
        f"dataset {prompts}: its rows are prompts only (format prompts): online DPO answers "
        "them (--rounds, see docs/online.md); train.py needs preference pairs")
