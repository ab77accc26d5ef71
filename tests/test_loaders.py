"""The bad-input corpus: every malformed data file, config or output dir stops `train.py` with
one clear line naming the file, row or field and what to do — no traceback, exit code != 0, and
no output that could pass for a finished run."""
import gzip
import json

import pytest

from tests.e2e import demo_env, run_train

pytestmark = pytest.mark.slow

ROWS = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."}
        for i in range(6)]


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


# name -> (files to write {name: str | bytes}, extra flags, words the error line must contain)
CASES = {
    "missing columns": ({"d.jsonl": jsonl([{"question": "q", "answer": "a"}] * 4)}, [],
                        ["cannot tell the preference format", "question"]),
    "wrong types": ({"d.jsonl": jsonl([{"prompt": 1, "chosen": 2, "rejected": 3}] * 4)}, [],
                    ["no usable preference pairs", "not_a_string"]),
    "empty file": ({"d.jsonl": ""}, [], ["d.jsonl", "empty"]),
    "blank lines only": ({"d.jsonl": "\n\n  \n"}, [], ["d.jsonl", "empty"]),
    "broken JSON line": ({"d.jsonl": jsonl(ROWS[:3]) + '{"prompt": "x", "chosen": \n'}, [],
                         ["JSON parse error", "row"]),
    "not JSON at all": ({"d.json": "this is not json\n"}, [], ["d.json"]),
    "all rows filtered": ({"d.jsonl": jsonl([{"prompt": "p", "chosen": "same", "rejected": "same"}]
                                            * 4)}, [], ["no usable preference pairs",
                                                        "identical"]),
    "non-UTF-8": ({"d.jsonl": jsonl(ROWS[:2]).encode() + b'{"prompt": "caf\xe9"}\n'}, [],
                  ["not UTF-8", "line 3", "re-encode"]),
    "non-UTF-8 gzip": ({"d.jsonl.gz": gzip.compress(b'{"prompt": "\xff"}\n')}, [],
                       ["not UTF-8"]),
    "missing data file": ({}, ["--dataset", "{tmp}/nope.jsonl"], ["nope.jsonl", "no such file"]),
    "folder without data": ({"notes.txt": "hello"}, ["--dataset", "{tmp}"], ["no data file"]),
    "corrupt parquet": ({"d.parquet": b"garbage"}, [], ["d.parquet", "Parquet"]),
    "too few rows": ({"d.jsonl": jsonl(ROWS)}, ["--num-samples", "50"],
                     ["num_samples=50", "at most"]),
    "strict mode bad row": ({"d.jsonl": jsonl(ROWS + [{"prompt": "p", "chosen": "", "rejected":
                                                       "r"}])},
                            ["--strict-data"], ["row 6", "strict"]),
    "unknown config key": ({"c.yaml": "betta: 0.1\n"}, ["--config", "{tmp}/c.yaml"],
                           ["unknown key 'betta'", "beta"]),
    "wrong type in config": ({"c.yaml": "batch_size: two\n"}, ["--config", "{tmp}/c.yaml"],
                             ["batch_size must be a int"]),
    "bad YAML": ({"c.yaml": "beta: [0.1\n"}, ["--config", "{tmp}/c.yaml"], ["not valid YAML"]),
    "missing config file": ({}, ["--config", "{tmp}/none.yaml"], ["no such file"]),
    "negative beta": ({}, ["--beta=-0.1"], ["beta must be a finite number > 0"]),
    "batch size 0": ({}, ["--batch-size", "0"], ["batch_size must be >= 1"]),
    "unknown loss type": ({}, ["--loss-type", "kto_pair"], ["loss_type", "kto_pair"]),
    "bad flag value": ({}, ["--learning-rate", "fast"], ["--learning-rate", "expected float"]),
    "missing model path": ({}, ["--model", "{tmp}/no_model"], ["no_model", "no such directory"]),
    "smoothing for hinge": ({}, ["--loss-type", "hinge", "--label-smoothing", "0.2"],
                            ["label_smoothing"]),
    "weights for other datasets": ({}, ["--dataset-weights", "1", "2"],
                                   ["dataset_weights: 2 values for 1 dataset", "one for each"]),
    "an empty mixture": ({}, ["--dataset"], ["--dataset", "expected at least one argument"]),
    "resume without checkpoint": ({}, ["--resume-from-checkpoint", "latest"],
                                  ["no complete checkpoint"]),
    "resume from a non-checkpoint": ({"x/trainer_state.json": "{}"},
                                     ["--resume-from-checkpoint", "{tmp}/x"],
                                     ["not a complete checkpoint"]),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return demo_env(tmp_path_factory.mktemp("dpo_cache"))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_line(env, tmp_path, name):
    files, flags, words = CASES[name]
    for rel, content in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    dataset = next((str(tmp_path / f) for f in files if f.startswith("d.")), "builtin:"
                   "demo-preferences")
    out = tmp_path / "run"
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    result = run_train(env, "--model", "builtin:tiny-qwen3", "--dataset", dataset,
                       "--num-samples", "none", "--max-length", "64", "--output-dir", str(out),
                       *flags, check=False, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert not out.exists(), "a failed run must not leave an output directory"


def test_output_dir_of_another_run_is_left_alone(env, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_text("another run's weights")
    result = run_train(env, "--model", "builtin:tiny-qwen3", "--dataset",
                       "builtin:demo-preferences", "--output-dir", str(out), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "is not empty" in result.stderr and "--resume-from-checkpoint" in result.stderr
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]


@pytest.mark.shared
def test_template_that_refuses_a_row_is_reported_or_one_strict_line(tmp_path, capsys):
    """Gemma 3's template refuses two user turns in a row: the run reports the row with the
    template's message and goes on; with --strict-data it stops with one ConfigError line."""
    from accelerate import Accelerator

    from dpo.config import ConfigError, TrainConfig
    from dpo.train.loaders import build_datasets
    from tests.conftest import GEMMA3_TOKENIZER, load_shared_tokenizer

    tokenizer = load_shared_tokenizer(GEMMA3_TOKENIZER)
    rows = [*ROWS[:3], {"prompt": [{"role": "user", "content": "Hi."},
                                   {"role": "user", "content": "Hello?"}],
                        "chosen": [{"role": "assistant", "content": "Hello."}],
                        "rejected": [{"role": "assistant", "content": "What."}]}]
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(rows))
    settings = dict(dataset=str(path), num_samples=None, eval_samples=0, max_length=64)
    message = "Conversation roles must alternate user/assistant/user/assistant/..."
    train_ds, _ = build_datasets(TrainConfig(**settings), Accelerator(cpu=True), tokenizer)
    assert sorted(train_ds["row_index"]) == [0, 1, 2]
    assert f'template_error 1 (rows 3; "{message}")' in capsys.readouterr().out
    with pytest.raises(ConfigError) as raised:
        build_datasets(TrainConfig(**settings, strict_data=True), Accelerator(cpu=True),
                       tokenizer)
    assert str(raised.value) == \
        f"dataset {path}: row 3: template_error: {message} (strict mode)"
