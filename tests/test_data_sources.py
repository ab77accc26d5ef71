"""Which rows are read (dpo.data.sources): configs, data_dir, splits and slices, eval sources,
the streamed seeded draw, and one clear line for each bad input — all on local files."""
import json
import os
import re

import datasets
import pandas as pd
import pytest

from dpo.train.checkpoint import RUN_IDENTITY
from dpo.config import ConfigError, TrainConfig
from dpo.data.sources import layout_warning, load_preference_splits, uses_streaming

SEED_FOLDERS = ("rl", "evaluation", "finetune", "reward")


def rows(tag, n):
    return [{"question": f"{tag} question {i}?", "response_j": f"{tag} good {i}.",
             "response_k": f"{tag} bad {i}."} for i in range(n)]


def questions(ds):
    return [row["prompt"][-1]["content"] for row in ds]


@pytest.fixture(scope="module")
def seed_layout(tmp_path_factory):
    """A folder laid out like lvwerra/stack-exchange-paired: data/{rl,evaluation,...}/*.parquet,
    each folder 3 shards of 20 rows."""
    root = tmp_path_factory.mktemp("seed_layout")
    for folder in SEED_FOLDERS:
        (root / "data" / folder).mkdir(parents=True)
        for shard in range(3):
            pd.DataFrame(rows(f"{folder}{shard}", 20)).to_parquet(
                root / "data" / folder / f"{shard:05d}.parquet")
    return root


def load(dataset, **kw):
    kw = {"num_samples": 10, "eval_samples": None, "seed": 0, **kw}
    return load_preference_splits(str(dataset), **kw)


def test_data_dir_reads_one_folder_and_eval_data_dir_another(seed_layout):
    train, eval_ = load(seed_layout, data_dir="data/rl", eval_data_dir="data/evaluation",
                        eval_split="train", eval_samples=4)
    assert len(train) == 10 and len(eval_) == 4
    assert all(q.startswith("rl") for q in questions(train))
    assert all(q.startswith("evaluation") for q in questions(eval_))


def test_the_stack_exchange_config_reads_data_rl_and_data_evaluation():
    from dpo.config import load_config
    from tests.conftest import ROOT

    cfg = load_config(["--config", str(ROOT / "configs" / "qwen3_0.6b_stack_exchange.yaml")])
    assert (cfg.data_dir, cfg.eval_data_dir, cfg.eval_split) == (["data/rl"], "data/evaluation",
                                                                 "train")


def test_a_separate_eval_source_without_test_split_must_name_its_split(seed_layout):
    with pytest.raises(ValueError, match=r"no test or validation split.*--eval-split.*'train'"):
        load(seed_layout, data_dir="data/rl", eval_data_dir="data/evaluation")


def test_eval_dataset_is_another_file(tmp_path):
    pd.DataFrame(rows("a", 30)).to_json(tmp_path / "a.jsonl", orient="records", lines=True)
    pd.DataFrame(rows("b", 30)).to_json(tmp_path / "b.jsonl", orient="records", lines=True)
    train, eval_ = load(tmp_path / "a.jsonl", eval_dataset=str(tmp_path / "b.jsonl"),
                        eval_split="train", eval_samples=5)
    assert len(train) == 10 and all(q.startswith("a ") for q in questions(train))
    assert len(eval_) == 5 and all(q.startswith("b ") for q in questions(eval_))


def test_split_slice_draws_only_from_the_slice(seed_layout):
    train, eval_ = load(seed_layout, data_dir="data/rl", split="train[:25%]", num_samples=None,
                        eval_samples=0)
    assert len(train) == 15  # a quarter of 60 rows
    assert sorted(train["row_index"]) == list(range(15))


@pytest.fixture(scope="module")
def twenty_rows(tmp_path_factory):
    """A 20-row JSONL file whose row i asks "q i?"."""
    path = tmp_path_factory.mktemp("twenty") / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q {i}?", "chosen": f"good {i}.",
                                        "rejected": f"bad {i}."}) + "\n" for i in range(20)))
    return path


def test_an_eval_slice_of_the_training_split_is_read_as_written(twenty_rows):
    """train[:80%] trains on rows 0-15 and train[80%:] evaluates on rows 16-19, all four by
    default; --num-samples draws from the training slice and --eval-samples from the eval one."""
    train, eval_ = load(twenty_rows, num_samples=None, split="train[:80%]",
                        eval_split="train[80%:]")
    assert sorted(train["row_index"]) == list(range(16))
    assert sorted(eval_["row_index"]) == [16, 17, 18, 19]
    assert sorted(questions(eval_)) == [f"q {i}?" for i in range(16, 20)]
    train, eval_ = load(twenty_rows, num_samples=6, split="train[:16]", eval_split="train[16:]",
                        eval_samples=2)
    assert len(train) == 6 and max(train["row_index"]) < 16
    assert len(eval_) == 2 and min(eval_["row_index"]) >= 16
    # Rows are named by their row in the split, also in a slice that does not start at 0.
    train, _ = load(twenty_rows, num_samples=None, split="train[10:20]", eval_split="train[:10]")
    assert sorted(train["row_index"]) == list(range(10, 20))
    assert all(q == f"q {i}?" for q, i in zip(questions(train), train["row_index"]))
    # The training split itself as eval split: rows are held out of the draw, as before.
    train, eval_ = load(twenty_rows, num_samples=None, split="train[:80%]",
                        eval_split="train[:80%]", eval_samples=3)
    assert len(eval_) == 3 and len(train) == 13
    assert max([*train["row_index"], *eval_["row_index"]]) < 16


@pytest.mark.parametrize("split, eval_split", [("train[:80%]", "train[50%:]"),
                                               ("train", "train[80%:]"),
                                               ("train[:10%]+train[-10%:]", "train[90%:]")])
def test_an_eval_slice_that_overlaps_the_training_slice_is_refused(twenty_rows, tiny_tokenizer,
                                                                    split, eval_split):
    from dpo.train.loaders import build_datasets

    with pytest.raises(ValueError, match=rf"eval_split {re.escape(repr(eval_split))} overlaps "
                                         rf"split {re.escape(repr(split))}") as e:
        load(twenty_rows, num_samples=None, split=split, eval_split=eval_split)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="overlaps split"):
        build_datasets(TrainConfig(dataset=str(twenty_rows), split=split, eval_split=eval_split,
                                   num_samples=None, max_length=64, tokenize_cache=False),
                       _Accelerator(), tiny_tokenizer)


def test_eval_split_names_a_split_of_the_same_source(tmp_path):
    """Without --eval-split the test split serves; naming validation takes that instead."""
    for split, n in (("train", 30), ("test", 8), ("validation", 8)):
        (tmp_path / split).mkdir()
        pd.DataFrame(rows(split, n)).to_parquet(tmp_path / split / "x.parquet")
    _, eval_ = load(tmp_path, eval_samples=3)
    assert all(q.startswith("test") for q in questions(eval_))
    _, eval_ = load(tmp_path, eval_split="validation", eval_samples=3)
    assert len(eval_) == 3 and all(q.startswith("validation") for q in questions(eval_))


def test_dataset_config_picks_a_builder_config(seed_layout):
    """A local folder has one config, ``default``; anything else is named with the options."""
    train, _ = load(seed_layout, dataset_config="default", data_dir="data/rl")
    assert len(train) == 9
    with pytest.raises(ValueError, match=r"dataset_config 'nope'.*default"):
        load(seed_layout, dataset_config="nope", data_dir="data/rl")


def test_unknown_split_data_dir_and_config_list_the_available_ones(seed_layout):
    with pytest.raises(ValueError, match=r"data_dir data/rl\) has no split 'dev'.*\['train'\]"):
        load(seed_layout, data_dir="data/rl", split="dev")
    with pytest.raises(ValueError, match=r"data_dir 'data/nope'.*data/evaluation, data/finetune"):
        load(seed_layout, data_dir="data/nope")
    with pytest.raises(ValueError, match=r"no split 'dev' \(eval_split\).*\['train'\]"):
        load(seed_layout, data_dir="data/rl", eval_split="dev")


def test_unreachable_hub_dataset_names_offline_mode_and_local_paths(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"cannot reach 'nobody-h5/made-up'.*HF_HUB_OFFLINE"
                                         r".*--dataset DIR") as e:
        load("nobody-h5/made-up", streaming=False)
    assert "\n" not in str(e.value)


def test_seed_layout_without_data_dir_warns_naming_data_dir(seed_layout):
    warning = layout_warning(str(seed_layout), None)
    assert "--data-dir" in warning and "leaves out 9 of its 12" in warning and "\n" not in warning
    assert layout_warning(str(seed_layout), "data/rl") is None


def test_plain_folders_and_files_get_no_layout_warning(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        pd.DataFrame(rows(split, 4)).to_parquet(tmp_path / split / "x.parquet")
    assert layout_warning(str(tmp_path), None) is None
    assert layout_warning(str(tmp_path / "train" / "x.parquet"), None) is None


def test_streaming_is_on_by_default_for_hub_names_only(tmp_path):
    assert uses_streaming("someone/data", None, 1000)
    assert not uses_streaming("someone/data", None, None)
    assert not uses_streaming(str(tmp_path), None, 1000)
    assert uses_streaming(str(tmp_path), True, 1000)


STREAMED = dict(data_dir="data/rl", streaming=True, shuffle_buffer_size=8, num_samples=12,
                eval_samples=2)


@pytest.fixture(scope="module")
def streamed_draw(seed_layout):
    """`STREAMED`'s draw, made once: each streamed draw of parquet shards takes 5 s (datasets
    5.2 sleeps `config.SLEEP_TIME_ON_THREADS_SHUTDOWN` as its reading threads end)."""
    return load(seed_layout, **STREAMED)


@pytest.mark.slow  # datasets waits ~5 s after each streamed draw
def test_streamed_draw_is_the_same_rows_for_the_same_seed(seed_layout, streamed_draw):
    """Every process draws the rows itself; the rows depend only on the seed and the data."""
    first, second = streamed_draw, load(seed_layout, **STREAMED)
    assert questions(first[0]) == questions(second[0])
    assert questions(first[1]) == questions(second[1])
    other = load(seed_layout, **{**STREAMED, "seed": 1})
    assert questions(other[0]) != questions(first[0])
    drawn = questions(first[0]) + questions(first[1])
    assert len(set(drawn)) == 12 and not set(questions(first[0])) & set(questions(first[1]))
    # Shards are shuffled too: the draw does not only come from the first file.
    assert len({q.split()[0] for q in drawn}) > 1


@pytest.mark.slow  # datasets waits ~5 s after each streamed draw
def test_streamed_eval_split_is_drawn_from_that_split(seed_layout):
    train, eval_ = load(seed_layout, data_dir="data/rl", eval_data_dir="data/evaluation",
                        eval_split="train", streaming=True, eval_samples=3)
    assert len(train) == 10 and len(eval_) == 3
    assert all(q.startswith("evaluation") for q in questions(eval_))


@pytest.mark.slow  # datasets waits ~5 s after each streamed draw
def test_streamed_split_with_fewer_rows_than_asked_is_one_line(seed_layout):
    with pytest.raises(ValueError, match="num_samples=61 but the streamed split has only 60"):
        load(seed_layout, data_dir="data/rl", streaming=True, num_samples=61)


def test_streaming_refuses_slices_and_drawing_everything(seed_layout):
    with pytest.raises(ValueError, match=r"split 'train\[:5%\]': a slice cannot be streamed"):
        load(seed_layout, data_dir="data/rl", streaming=True, split="train[:5%]")
    with pytest.raises(ConfigError, match=r"a slice cannot be streamed.*--no-streaming"):
        TrainConfig(streaming=True, split="train[:5%]")
    with pytest.raises(ConfigError, match="eval_split"):
        TrainConfig(streaming=True, eval_split="test[:10]")
    with pytest.raises(ConfigError, match="num_samples is none"):
        TrainConfig(streaming=True, num_samples=None)
    with pytest.raises(ConfigError, match="shuffle_buffer_size must be >= 1"):
        TrainConfig(shuffle_buffer_size=0)
    assert TrainConfig(split="train[:5%]").split == ["train[:5%]"]


def test_resume_identity_covers_which_rows_are_drawn():
    for name in ("dataset_config", "data_dir", "split", "eval_dataset", "eval_dataset_config",
                 "eval_data_dir", "eval_split", "streaming", "shuffle_buffer_size",
                 "dataset_weights", "dataset_num_samples"):
        assert name in RUN_IDENTITY


def test_flags_reach_the_config():
    from dpo.config import load_config
    cfg = load_config(["--dataset-config", "c", "--data-dir", "data/rl", "--split", "train[:5%]",
                       "--eval-dataset", "e", "--eval-dataset-config", "ec", "--eval-data-dir",
                       "data/evaluation", "--eval-split", "train", "--no-streaming",
                       "--shuffle-buffer-size", "100"])
    assert (cfg.dataset_config, cfg.data_dir, cfg.split, cfg.eval_dataset, cfg.eval_dataset_config,
            cfg.eval_data_dir, cfg.eval_split, cfg.streaming, cfg.shuffle_buffer_size) == (
        ["c"], ["data/rl"], ["train[:5%]"], "e", "ec", "data/evaluation", "train", False, 100)
    assert json.dumps(cfg.streaming) == "false"


def test_resume_that_changes_the_draw_is_refused(tmp_path):
    from dpo.train.checkpoint import STATE_FILE, check_resume, trainer_state

    saved = TrainConfig(data_dir="data/rl", output_dir=str(tmp_path))
    (tmp_path / STATE_FILE).write_text(json.dumps(trainer_state(saved, 1, global_step=3)))
    assert check_resume(tmp_path, saved, 1) == []
    changed = TrainConfig(data_dir="data/finetune", streaming=False, output_dir=str(tmp_path))
    with pytest.raises(ConfigError,
                       match=r"data_dir \['data/rl'\] -> \['data/finetune'\].*streaming"):
        check_resume(tmp_path, changed, 1)


CHILD_DRAW = """
import json, sys
from dpo.data.sources import load_preference_splits
train, eval_ = load_preference_splits(sys.argv[1], data_dir="data/rl", num_samples=12,
                                      eval_samples=2, seed=0, streaming=True,
                                      shuffle_buffer_size=8)
print(json.dumps([r["prompt"][-1]["content"] for r in train]))
"""


@pytest.mark.slow  # datasets waits ~5 s after each streamed draw
def test_another_process_draws_the_same_streamed_rows(seed_layout, streamed_draw):
    """What each process of a launch does: draw the rows itself, and get the same ones."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    here = questions(streamed_draw[0])  # CHILD_DRAW's arguments
    env = {**os.environ, "PYTHONHASHSEED": "123", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD_DRAW, str(seed_layout)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


class _Accelerator:
    """What `build_datasets` asks of an Accelerator, on one process."""

    num_processes = 1

    def __init__(self):
        self.printed = []

    def main_process_first(self):
        import contextlib
        return contextlib.nullcontext()

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))


def test_build_datasets_warns_on_the_seed_layout_and_reads_data_dir(seed_layout, tiny_tokenizer):
    from dpo.data import prepare_tokenizer
    from dpo.train.loaders import build_datasets

    tiny_tokenizer = prepare_tokenizer(tiny_tokenizer)
    accelerator = _Accelerator()
    with pytest.raises(ConfigError, match=r"has no split 'train'; it has \['test'\]"):
        build_datasets(TrainConfig(dataset=str(seed_layout), num_samples=10), accelerator,
                       tiny_tokenizer)
    assert any("--data-dir" in line for line in accelerator.printed)
    accelerator = _Accelerator()
    cfg = TrainConfig(dataset=str(seed_layout), data_dir="data/rl", eval_data_dir="data/evaluation",
                      eval_split="train", num_samples=10, eval_samples=3, max_length=64)
    train, eval_ = build_datasets(cfg, accelerator, tiny_tokenizer)
    assert (len(train), len(eval_)) == (10, 3)
    assert not any("warning" in line for line in accelerator.printed)


def test_an_eval_set_that_filtering_empties_is_named_with_its_reasons(tmp_path, tiny_tokenizer):
    """The training pairs are fine, the eval rows are all dropped: the line names the eval rows
    (a test split; a slice) and the filter report's reasons, not the dataset as a whole."""
    from dpo.data import prepare_tokenizer
    from dpo.train.loaders import build_datasets

    tokenizer = prepare_tokenizer(tiny_tokenizer)
    pair = {"prompt": "q?", "chosen": "yes.", "rejected": "no."}
    _jsonl(tmp_path / "d" / "train.jsonl", [pair] * 10)
    _jsonl(tmp_path / "d" / "test.jsonl", [{**pair, "rejected": "yes."}] * 4)
    cfg = TrainConfig(dataset=str(tmp_path / "d"), num_samples=None, eval_samples=4,
                      max_length=16, tokenize_cache=False)
    with pytest.raises(ConfigError, match=r"d: eval pairs: none is left of its test split: kept "
                                          r"0 of 4 pairs .*identical 4 .*10 training pairs are "
                                          r"kept.*--eval-samples 0") as e:
        build_datasets(cfg, _Accelerator(), tokenizer)
    assert "\n" not in str(e.value)
    _jsonl(tmp_path / "e.jsonl", [pair] * 16 + [{**pair, "chosen": " "}] * 4)
    cfg = TrainConfig(dataset=str(tmp_path / "e.jsonl"), split="train[:80%]", max_length=16,
                      eval_split="train[80%:]", num_samples=None, tokenize_cache=False)
    with pytest.raises(ConfigError, match=r"none is left of eval_split train\[80%:\]: .*"
                                          r"empty 4 \(rows 16, 17, 18, 19\)"):
        build_datasets(cfg, _Accelerator(), tokenizer)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_build_datasets_turns_an_unreachable_hub_dataset_into_one_line(monkeypatch,
                                                                        tiny_tokenizer):
    from dpo.train.loaders import build_datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"HF_HUB_OFFLINE.*--dataset DIR") as e:
        build_datasets(TrainConfig(dataset="nobody-h5/made-up"), _Accelerator(), tiny_tokenizer)
    assert "\n" not in str(e.value)
