"""Mixtures (dpo.data.mixture): shares of num_samples and eval_samples, per-dataset settings and
format detection, per-dataset filter reports and eval sources, and one line per bad input."""
import json
import re

import pandas as pd
import pytest

from dpo.train.checkpoint import STATE_FILE, check_resume, trainer_state
from dpo.config import ConfigError, TrainConfig, load_config
from dpo.data import prepare_tokenizer
from dpo.data.mixture import apportion, dataset_name, dataset_names, plan
from dpo.train.loaders import build_datasets
from tests.test_data_sources import _Accelerator


def test_apportion_by_hand():
    """1000 by 3:1 → 750, 250. 10 by 1:1:1 → 3.33 each: floors 3, 3, 3 and the one left goes to
    the first (equal remainders). 7 by 1:2 → 2.33, 4.67: floors 2, 4, the one left to the larger
    remainder → 2, 5. Counts that add up to the total come back unchanged."""
    assert apportion(1000, [3, 1]) == [750, 250]
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(7, [1, 2]) == [2, 5]
    assert apportion(700, [300, 400]) == [300, 400]
    assert apportion(1000, [0.6, 0.3, 0.1]) == [600, 300, 100]


@pytest.mark.parametrize("total", [1, 7, 99, 1000, 12345])
def test_apportion_always_adds_up(total):
    for weights in ([1], [0.2, 0.8], [5, 1, 1, 3], [1e-3, 1, 1e3]):
        counts = apportion(total, weights)
        assert sum(counts) == total and min(counts) >= 0
        shares = [total * w / sum(weights) for w in weights]
        assert all(abs(c - s) < 1 for c, s in zip(counts, shares))


def test_plan_shares_eval_samples_by_the_same_weights():
    assert plan(40, 8, [2, 1, 1], 3) == [(20, 4), (10, 2), (10, 2)]
    assert plan(40, None, None, 2) == [(20, None), (20, None)]  # equal shares by default
    assert plan(None, 6, None, 3) == [(None, 2)] * 3
    assert plan(1000, 10, None, 1) == [(1000, 10)]


def test_dataset_names():
    assert dataset_name("lvwerra/stack-exchange-paired") == "stack-exchange-paired"
    assert dataset_name("/x/hh_rlhf_helpful_base_test.jsonl.gz") == "hh_rlhf_helpful_base_test"
    assert dataset_name("data/pairs.parquet") == "pairs"
    assert dataset_name("/x/folder/") == "folder"
    assert dataset_name("builtin:demo-preferences") == "demo-preferences"
    # The same dataset twice, told apart by what differs; then by place.
    assert dataset_names(["org/se", "org/se"], [None, None], ["data/rl", "data/evaluation"],
                         ["train", "train"]) == ["se-rl", "se-evaluation"]
    assert dataset_names(["a/x.json", "b/x.json", "c"], [None] * 3, [None] * 3,
                         ["train"] * 3) == ["x-1", "x-2", "c"]
    assert dataset_names(["x.json", "x.json"], [None] * 2, [None] * 2,
                         ["train[:50%]", "train[50%:]"]) == ["x-train[:50%]", "x-train[50%:]"]


def test_flags_and_yaml_take_one_value_for_all_or_one_each(tmp_path):
    cfg = load_config(["--dataset", "a.json", "b", "c", "--data-dir", "none", "data/rl", "none",
                       "--dataset-config", "none", "default", "none", "--split", "train",
                       "--dataset-num-samples", "30", "10", "5", "--no-streaming"])
    assert cfg.dataset == ["a.json", "b", "c"] and cfg.num_samples == 45
    assert cfg.per_dataset("data_dir") == [None, "data/rl", None]
    assert cfg.per_dataset("dataset_config") == [None, "default", None]
    assert cfg.per_dataset("split") == ["train"] * 3
    assert cfg.per_dataset("data_format") == [None] * 3
    (tmp_path / "c.yaml").write_text("dataset: [a.json, b.json]\ndataset_weights: [3, 1]\n"
                                     "data_format: standard\nstreaming: false\n")
    cfg = load_config(["--config", str(tmp_path / "c.yaml")])
    assert cfg.dataset_weights == [3.0, 1.0] and cfg.per_dataset("data_format") == ["standard"] * 2
    assert load_config(["--config", str(tmp_path / "c.yaml"), "--dataset", "x.json", "y.json"]
                       ).dataset == ["x.json", "y.json"]
    # Counts in the file, num_samples from the flags: the two must agree.
    (tmp_path / "n.yaml").write_text("dataset: [a.json, b.json]\ndataset_num_samples: [3, 1]\n")
    assert load_config(["--config", str(tmp_path / "n.yaml")]).num_samples == 4
    with pytest.raises(ConfigError, match="num_samples 10 but dataset_num_samples add up to 4"):
        load_config(["--config", str(tmp_path / "n.yaml"), "--num-samples", "10"])


BAD = {
    "weights for other datasets": (dict(dataset=["a", "b"], dataset_weights=[1.0, 2.0, 3.0]),
                                   r"dataset_weights: 3 values for 2 datasets \(a, b\)"),
    "a zero weight": (dict(dataset=["a", "b"], dataset_weights=[1.0, 0.0]), "must be > 0"),
    "weights without num_samples": (dict(dataset=["a", "b"], dataset_weights=[1.0, 1.0],
                                         num_samples=None, streaming=False), "which is none"),
    "weights and counts": (dict(dataset=["a", "b"], dataset_weights=[1.0, 1.0],
                                dataset_num_samples=[1, 1], num_samples=2), "give one of them"),
    "counts that miss num_samples": (dict(dataset=["a", "b"], dataset_num_samples=[3, 4]),
                                     "num_samples 1000 but dataset_num_samples add up to 7"),
    "a count of 0": (dict(dataset=["a", "b"], dataset_num_samples=[0, 4], num_samples=4),
                     "must be >= 1 each"),
    "a dataset left with no rows": (dict(dataset=["a", "b"], dataset_weights=[1000.0, 1.0],
                                         num_samples=100), "dataset b gets 0 of"),
    "an empty mixture": (dict(dataset=[]), "dataset: the list is empty"),
    "three splits for two datasets": (dict(dataset=["a", "b"], split=["x", "y", "z"]),
                                      "split: 3 values for 2 datasets"),
    "the same dataset twice": (dict(dataset=["a", "a"]), "a is listed twice"),
    "one eval dataset for a mixture": (dict(dataset=["a", "b"], eval_dataset="c"),
                                       "eval_dataset: a mixture"),
    "an unknown format of one": (dict(dataset=["a", "b"], data_format=["standard", "nope"]),
                                 "data_format: 'nope'"),
    "a slice streamed": (dict(dataset=["a", "b"], split=["train", "train[:5]"], streaming=True),
                         "a slice cannot be streamed"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_mixtures_are_one_line(name):
    fields, match = BAD[name]
    with pytest.raises(ConfigError, match=match) as e:
        TrainConfig(**fields)
    assert "\n" not in str(e.value)


def test_a_checkpoint_saved_before_mixtures_resumes(tmp_path):
    """Checkpoints written when `dataset`, `split`, ... held one value still resume."""
    cfg = TrainConfig(dataset="d.json", data_dir="data/rl", output_dir=str(tmp_path))
    state = trainer_state(cfg, 1, step=3)
    for name in ("dataset", "data_dir", "split"):
        state["config"][name] = state["config"][name][0]
    for name in ("dataset_weights", "dataset_num_samples"):
        del state["config"][name]
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert check_resume(tmp_path, cfg, 1) == []
    reweighed = TrainConfig(dataset=["d.json", "e.json"], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"dataset \['d.json'\] -> \['d.json', 'e.json'\]"):
        check_resume(tmp_path, reweighed, 1)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """Three datasets in three formats and layouts:

    - ``a/``: a folder with ``train.jsonl`` (20 rows, 2 of them identical pairs) and
      ``test.jsonl`` (6 rows), format ``standard``;
    - ``b/``: laid out like the seed dataset, ``data/rl`` (3 parquet shards of 10 rows) beside
      ``data/evaluation``, format ``stack_exchange``;
    - ``c.jsonl``: 20 HH-RLHF transcripts (``chosen``/``rejected`` only, ``implicit_prompt``).
    """
    root = tmp_path_factory.mktemp("mixture")
    train = [{"prompt": f"A question {i}?", "chosen": f"A good {i}.", "rejected": f"A bad {i}."}
             for i in range(18)]
    train += [{"prompt": f"A same {i}?", "chosen": "A same.", "rejected": "A same."}
              for i in range(2)]
    _jsonl(root / "a" / "train.jsonl", train)
    _jsonl(root / "a" / "test.jsonl", [{"prompt": f"A test {i}?", "chosen": "Yes.",
                                        "rejected": "No."} for i in range(6)])
    for folder in ("rl", "evaluation"):
        (root / "b" / "data" / folder).mkdir(parents=True)
        for shard in range(3):
            pd.DataFrame([{"question": f"B {folder} {shard}.{i}?", "response_j": f"B good {i}.",
                           "response_k": f"B bad {i}."} for i in range(10)]).to_parquet(
                root / "b" / "data" / folder / f"{shard:05d}.parquet")
    _jsonl(root / "c.jsonl", [{"chosen": f"\n\nHuman: C question {i}?\n\nAssistant: C good {i}.",
                               "rejected": f"\n\nHuman: C question {i}?\n\nAssistant: C bad."}
                              for i in range(20)])
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_a_mixture_draws_each_dataset_its_share(three_sources, tiny_tokenizer, streaming):
    """40 rows by weights 2:1:1 are 20, 10, 10 drawn; 8 eval rows are 4, 2, 2: `a`'s from its test
    split, `b`'s and `c`'s held out of their draws. Each dataset has its own format, data_dir,
    config and split (`c` reads only its first 15 rows when not streaming); each gets its own filter
    report (only `a` drops rows); eval rows say which dataset they come from."""
    root = three_sources
    accelerator = _Accelerator()
    cfg = TrainConfig(dataset=[str(root / "a"), str(root / "b"), str(root / "c.jsonl")],
                      dataset_weights=[2, 1, 1], num_samples=40, eval_samples=8, max_length=64,
                      data_dir=[None, "data/rl", None], dataset_config=[None, "default", None],
                      split=["train", "train", "train" if streaming else "train[:15]"],
                      data_format=[None, "stack_exchange", None], streaming=streaming,
                      shuffle_buffer_size=4, tokenize_cache=False)
    train, evals = build_datasets(cfg, accelerator, prepare_tokenizer(tiny_tokenizer))
    text = [tiny_tokenizer.decode(ids) for ids in train["chosen_input_ids"]]
    assert [sum(t.count(f"{tag} ") > 0 for t in text) for tag in "ABC"] == [18, 8, 8]
    assert not any("B evaluation" in t for t in text)
    if not streaming:
        assert max(row for row, t in zip(train["row_index"], text) if "C " in t) < 15
    assert evals["source"] == [0] * 4 + [1] * 2 + [2] * 2
    eval_text = [tiny_tokenizer.decode(ids) for ids in evals["chosen_input_ids"]]
    assert all("A test" in t for t in eval_text[:4])
    assert all("B rl" in t for t in eval_text[4:6]) and all("C " in t for t in eval_text[6:])
    reports = [line for line in accelerator.printed if line.startswith("train pairs")]
    assert reports[0].startswith("train pairs (a): kept 18 of 20") and "identical 2" in reports[0]
    assert reports[1].startswith("train pairs (b): kept 8 of 8") and "dropped none" in reports[1]
    assert reports[2].startswith("train pairs (c): kept 8 of 8") and "dropped none" in reports[2]
    assert reports[3] == "train pairs: 34 from 3 datasets (a 18, b 8, c 8)"


def test_each_dataset_draws_the_same_rows_alone_or_in_a_mixture(three_sources, tiny_tokenizer):
    """A dataset's draw does not depend on the others: the first dataset of a mixture draws what
    it draws alone (seed), the second what it draws alone with seed + 1."""
    root = three_sources
    tokenizer = prepare_tokenizer(tiny_tokenizer)
    common = dict(num_samples=10, eval_samples=0, max_length=64, tokenize_cache=False)
    mixed, _ = build_datasets(TrainConfig(dataset=[str(root / "a"), str(root / "c.jsonl")],
                                             num_samples=20, eval_samples=0, max_length=64,
                                             tokenize_cache=False), _Accelerator(), tokenizer)
    alone_a, _ = build_datasets(TrainConfig(dataset=str(root / "a"), **common),
                                   _Accelerator(), tokenizer)
    alone_c, _ = build_datasets(TrainConfig(dataset=str(root / "c.jsonl"), seed=43, **common),
                                   _Accelerator(), tokenizer)
    a_rows = len(alone_a)  # the identical pairs it drew are dropped alike
    assert mixed["chosen_input_ids"][:a_rows] == alone_a["chosen_input_ids"]
    assert mixed["chosen_input_ids"][a_rows:] == alone_c["chosen_input_ids"]


def test_an_error_names_the_dataset_it_comes_from(three_sources, tiny_tokenizer):
    root = three_sources
    cfg = TrainConfig(dataset=[str(root / "a"), str(root / "c.jsonl")], dataset_num_samples=[4, 40],
                      num_samples=44, max_length=64, tokenize_cache=False)
    with pytest.raises(ConfigError, match=rf"dataset {root / 'c.jsonl'}: num_samples=40 but the "
                                          "split has 20 rows"):
        build_datasets(cfg, _Accelerator(), prepare_tokenizer(tiny_tokenizer))


def test_an_eval_split_slice_applies_to_each_dataset(three_sources, tiny_tokenizer):
    """--eval-split train[80%:] reads rows 16-19 of each dataset, beside its own training slice
    (`a`'s rows 18 and 19 are identical pairs, dropped when tokenized); a dataset whose training
    split overlaps it is named in the one-line refusal."""
    root = three_sources
    tokenizer = prepare_tokenizer(tiny_tokenizer)
    cfg = dict(dataset=[str(root / "a"), str(root / "c.jsonl")], eval_split="train[80%:]",
               num_samples=None, max_length=64, tokenize_cache=False)
    _, evals = build_datasets(TrainConfig(split=["train[:80%]", "train[:50%]"], **cfg),
                              _Accelerator(), tokenizer)
    assert evals["source"] == [0] * 2 + [1] * 4
    assert sorted(evals["row_index"][:2]) == [16, 17]
    assert sorted(evals["row_index"][2:]) == [16, 17, 18, 19]
    with pytest.raises(ConfigError, match=rf"dataset {root / 'c.jsonl'}: eval_split "
                                          r"'train\[80%:\]' overlaps split 'train'"):
        build_datasets(TrainConfig(split=["train[:80%]", "train"], **cfg), _Accelerator(),
                       tokenizer)


def test_a_dataset_whose_eval_rows_are_all_dropped_is_left_out_of_eval(three_sources, tmp_path,
                                                                       tiny_tokenizer):
    """`d`'s test split holds only identical pairs: one warning line names it and its reasons, and
    `a` is evaluated alone; when no dataset has an eval pair left, the run stops in one line."""
    tokenizer = prepare_tokenizer(tiny_tokenizer)
    for name in ("d", "e"):
        _jsonl(tmp_path / name / "train.jsonl", [{"prompt": f"{name} {i}?", "chosen": "Yes.",
                                                  "rejected": "No."} for i in range(8)])
        _jsonl(tmp_path / name / "test.jsonl", [{"prompt": f"{name}?", "chosen": "Same.",
                                                 "rejected": "Same."}] * 3)
    accelerator = _Accelerator()
    cfg = dict(num_samples=None, max_length=64, tokenize_cache=False)
    train, evals = build_datasets(TrainConfig(dataset=[str(three_sources / "a"),
                                                       str(tmp_path / "d")], **cfg),
                                  accelerator, tokenizer)
    assert len(train) == 18 + 8 and evals["source"] == [0] * 2  # 10% of a's 20 rows
    warnings = [line for line in accelerator.printed if line.startswith("warning")]
    assert len(warnings) == 1 and re.fullmatch(
        r"warning: eval pairs \(d\): none is left of its test split: kept 0 of 1 pairs \(0 "
        r"truncated\), dropped 1: identical 1 \(rows \d\); d is left out of eval, the other "
        r"datasets are evaluated", warnings[0])
    with pytest.raises(ConfigError, match=r"no eval pair is left of any dataset \(d: none is "
                                          r"left .*identical 1.*; e: none is left"):
        build_datasets(TrainConfig(dataset=[str(tmp_path / "d"), str(tmp_path / "e")], **cfg),
                       _Accelerator(), tokenizer)
