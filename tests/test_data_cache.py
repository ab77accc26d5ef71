"""The tokenized-pairs cache: a second call loads instead of tokenizing, anything that changes
the result misses, a half-written entry is never read, and under a launcher every process after
the first loads the first's result."""
import contextlib
import importlib
import json
import textwrap
from pathlib import Path

import pytest
from accelerate import Accelerator
from datasets import Dataset

from dpo import data
from dpo.train import loaders
from dpo.config import TrainConfig
from dpo.data import cache, prepare_tokenizer
from dpo.data import tokenize as tokenize_module
from tests.conftest import ROOT
from tests.e2e import ACCELERATE, demo_env, run_launched

SETTINGS = dict(max_length=64, max_prompt_length=None, chat_template="auto", strict=False,
                num_proc=None)


def messages(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def make_rows(count: int = 24) -> list[dict]:
    """Normalised rows; every sixth pair has identical responses, so the report drops some."""
    return [{"prompt": messages("user", f"What is {i} plus {i}?"),
             "chosen": messages("assistant", f"It is {2 * i}."),
             "rejected": messages("assistant", f"It is {2 * i}." if i % 6 == 0 else "No idea.")}
            for i in range(count)]


@pytest.fixture
def rows():
    return Dataset.from_list(make_rows())


@pytest.fixture
def calls(monkeypatch):
    """The calls that reached tokenize_preferences, by either of its names."""
    seen = []
    original = tokenize_module.tokenize_preferences

    def counting(ds, tokenizer, **settings):
        seen.append(settings)
        return original(ds, tokenizer, **settings)

    monkeypatch.setattr(tokenize_module, "tokenize_preferences", counting)
    monkeypatch.setattr(data, "tokenize_preferences", counting)
    return seen


def entries(cache_dir: Path) -> list[Path]:
    """The entries a reader can find (temporary folders start with a dot)."""
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith("."))


def test_second_call_loads_what_the_first_saved(rows, tiny_chat_tokenizer, calls, tmp_path):
    expected, expected_report = tokenize_module.tokenize_preferences(rows, tiny_chat_tokenizer,
                                                                     **SETTINGS)
    calls.clear()
    lines = []
    first, first_report = cache.tokenize_cached(rows, tiny_chat_tokenizer, cache_dir=tmp_path,
                                                log=lines.append, **SETTINGS)
    second, second_report = cache.tokenize_cached(rows, tiny_chat_tokenizer, cache_dir=tmp_path,
                                                  log=lines.append, **SETTINGS)
    assert len(calls) == 1  # the second call did not tokenize
    assert "saved to cache" in lines[0] and "loaded from cache" in lines[1]
    [entry] = entries(tmp_path)
    assert all(Path(f["filename"]).is_relative_to(entry) for f in second.cache_files)
    for got, report in ((first, first_report), (second, second_report)):
        assert got.to_dict() == expected.to_dict()
        assert report == expected_report and str(report) == str(expected_report)
    assert expected_report.dropped == {"identical": 4}  # the report's detail survives the trip


def test_equal_rows_hit_however_the_dataset_was_built(tiny_chat_tokenizer, calls, tmp_path):
    """An in-memory dataset's fingerprint is random: the key hashes the rows' content."""
    cache.tokenize_cached(Dataset.from_list(make_rows()), tiny_chat_tokenizer,
                          cache_dir=tmp_path, **SETTINGS)
    doubled = Dataset.from_list(make_rows() * 2)
    reversed_rows = Dataset.from_list(make_rows()[::-1])
    for same in (doubled.select(range(24)), doubled.select(range(24, 48)),  # slices
                 reversed_rows.select(range(23, -1, -1))):  # an indices mapping
        cache.tokenize_cached(same, tiny_chat_tokenizer, cache_dir=tmp_path, **SETTINGS)
    assert len(calls) == 1


def _other_template(tokenizer):
    tokenizer.chat_template = tokenizer.chat_template.replace("<|", "<<|")
    return tokenizer


def _other_eos(tokenizer):
    tokenizer.eos_token = "<s>"
    return tokenizer


def _one_char(rows):
    changed = make_rows()
    changed[5]["chosen"] = messages("assistant", "It is 10!")
    return Dataset.from_list(changed)


# name -> (change to the rows, change to the tokenizer, change to the settings)
CHANGES = {
    "max_length": (None, None, {"max_length": 48}),
    "max_prompt_length": (None, None, {"max_prompt_length": 8}),
    "chat_template": (None, None, {"chat_template": "plain"}),
    "strict": (None, None, {"strict": True}),
    "chat template": (None, _other_template, {}),
    "eos token": (None, _other_eos, {}),
    "one character of one row": (_one_char, None, {}),
    "row order": (lambda rows: rows.select(range(len(rows) - 1, -1, -1)), None, {}),
    "one row fewer": (lambda rows: rows.select(range(len(rows) - 1)), None, {}),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_to_rows_tokenizer_or_settings_misses(change, rows, tiny_chat_tokenizer,
                                                       tiny_tokenizer_json, calls, tmp_path):
    from tests.conftest import TINY_CHAT_TEMPLATE, _build_tiny_tokenizer

    cache.tokenize_cached(rows, tiny_chat_tokenizer, cache_dir=tmp_path, **SETTINGS)
    change_rows, change_tokenizer, settings = CHANGES[change]
    changed_rows = change_rows(rows) if change_rows else rows
    tokenizer = _build_tiny_tokenizer(tiny_tokenizer_json, TINY_CHAT_TEMPLATE)
    tokenizer = change_tokenizer(tokenizer) if change_tokenizer else tokenizer
    settings = {**SETTINGS, **settings}
    if settings["strict"]:
        with pytest.raises(ValueError, match="strict mode"):  # a cached result would hide it
            cache.tokenize_cached(changed_rows, tokenizer, cache_dir=tmp_path, **settings)
        assert len(calls) == 2
        return
    got, report = cache.tokenize_cached(changed_rows, tokenizer, cache_dir=tmp_path, **settings)
    assert len(calls) == 2
    want, want_report = tokenize_module.tokenize_preferences(changed_rows, tokenizer, **settings)
    assert got.to_dict() == want.to_dict() and report == want_report
    assert len(entries(tmp_path)) == 2


def test_every_setting_is_keyed_except_the_process_count(rows, tiny_chat_tokenizer):
    key = cache.cache_key(rows, tiny_chat_tokenizer, SETTINGS)
    # A setting tokenize_preferences gains later is keyed without a change to the cache.
    assert cache.cache_key(rows, tiny_chat_tokenizer, {**SETTINGS, "new_setting": 1}) != key
    assert cache.cache_key(rows, tiny_chat_tokenizer, {**SETTINGS, "num_proc": 4}) == key


# Every module whose code decides the tokenized rows or the report (not one fewer).
TOKENS_MODULES = ["dpo.data.formats", "dpo.data.render", "dpo.data.report", "dpo.data.tokenize"]


@pytest.mark.parametrize("name", TOKENS_MODULES)
def test_an_edit_to_the_code_that_shapes_the_tokens_misses(name, rows, tiny_chat_tokenizer,
                                                          tmp_path, monkeypatch):
    """Both keys, this cache's and the one datasets' map cache is given, see any edit."""
    from dpo.data.tokenize import _fingerprint, _PairTokenizer

    pair_tokenizer = _PairTokenizer(tiny_chat_tokenizer, max_length=64, max_prompt_length=32,
                                    mode="auto")

    def keys():
        return (cache.cache_key(rows, tiny_chat_tokenizer, SETTINGS),
                _fingerprint(rows, pair_tokenizer))

    before, module = keys(), importlib.import_module(name)
    edited = tmp_path / "edited.py"
    edited.write_text(Path(module.__file__).read_text() + "\n# edited\n")
    monkeypatch.setattr(module, "__file__", str(edited))
    after = keys()
    assert after[0] != before[0] and after[1] != before[1]


def test_a_crash_while_writing_leaves_nothing_to_read(rows, tiny_chat_tokenizer, calls,
                                                      tmp_path):
    """Killed mid-write (here: an exception, with the clean-up disabled as a kill skips it), the
    entry is invisible both during the write and after it; the next call tokenizes again."""
    original_save = Dataset.save_to_disk
    seen_during_write = []

    def crashing_save(self, path, **kwargs):
        original_save(self, path, **kwargs)
        arrow = next(Path(path).glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
        seen_during_write.extend(entries(tmp_path))
        raise KeyboardInterrupt  # what a SIGINT raises; a SIGKILL would not even clean up

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Dataset, "save_to_disk", crashing_save)
        patch.setattr(cache.shutil, "rmtree", lambda *args, **kwargs: None)
        cache.tokenize_cached(rows, tiny_chat_tokenizer, cache_dir=tmp_path, **SETTINGS)
    assert seen_during_write == [] and entries(tmp_path) == []
    assert any(p.name.startswith(".") for p in tmp_path.iterdir())  # the half-written folder
    calls_before = len(calls)
    got, _ = cache.tokenize_cached(rows, tiny_chat_tokenizer, cache_dir=tmp_path, **SETTINGS)
    assert len(calls) == calls_before + 1
    assert got.to_dict() == tokenize_module.tokenize_preferences(rows, tiny_chat_tokenizer,
                                                                 **SETTINGS)[0].to_dict()


@pytest.mark.parametrize("damage", ["no report", "another key", "rows lost", "data deleted"])
def test_a_damaged_entry_is_ignored_and_rewritten(damage, rows, tiny_chat_tokenizer, calls,
                                                  tmp_path):
    want, _ = cache.tokenize_cached(rows, tiny_chat_tokenizer, cache_dir=tmp_path, **SETTINGS)
    want = want.to_dict()
    [entry] = entries(tmp_path)
    meta_file = entry / cache.REPORT_FILE
    meta = json.loads(meta_file.read_text())
    if damage == "no report":
        meta_file.unlink()
    elif damage == "another key":
        meta_file.write_text(json.dumps({**meta, "key": "0" * 64}))
    elif damage == "rows lost":
        meta_file.write_text(json.dumps({**meta, "rows": meta["rows"] + 1}))
    else:
        for arrow in entry.glob("*.arrow"):
            arrow.unlink()
    # A missing report is a folder still being written by hand, or gone: no warning for it.
    with (contextlib.nullcontext() if damage == "no report"
          else pytest.warns(UserWarning, match="ignoring tokenized-data cache")):
        got, _ = cache.tokenize_cached(rows, tiny_chat_tokenizer, cache_dir=tmp_path, **SETTINGS)
    assert len(calls) == 2 and got.to_dict() == want
    cache.tokenize_cached(rows, tiny_chat_tokenizer, cache_dir=tmp_path, **SETTINGS)
    assert len(calls) == 2  # rewritten: the next call hits


def test_no_cache_dir_tokenizes_every_time(rows, tiny_chat_tokenizer, calls, tmp_path):
    for _ in range(2):
        cache.tokenize_cached(rows, tiny_chat_tokenizer, cache_dir=None, **SETTINGS)
    assert len(calls) == 2


def test_default_cache_dir_follows_dpo_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / "tokenized"


@pytest.mark.parametrize("enabled", [True, False])
def test_build_datasets_uses_the_cache_unless_turned_off(enabled, tiny_chat_tokenizer, calls,
                                                         tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path))
    cfg = TrainConfig(dataset="builtin:demo-preferences", num_samples=40, max_length=64,
                      tokenize_cache=enabled)
    accelerator, tokenizer = Accelerator(cpu=True), prepare_tokenizer(tiny_chat_tokenizer)
    first = loaders.build_datasets(cfg, accelerator, tokenizer)
    second = loaders.build_datasets(cfg, accelerator, tokenizer)
    assert len(calls) == (2 if enabled else 4)  # train and eval, once or every time
    assert (tmp_path / "tokenized").exists() == enabled
    for a, b in zip(first, second):
        assert a.to_dict() == b.to_dict()


SCRIPT = textwrap.dedent("""
    import json, sys
    from dpo import data, demo
    from dpo.train import loaders
    from dpo.config import TrainConfig
    from dpo.data import tokenize
    from dpo.model.loading import load_tokenizer
    from dpo.train.runtime import make_accelerator

    calls = []
    original = tokenize.tokenize_preferences
    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    tokenize.tokenize_preferences = data.tokenize_preferences = counting
    cfg = TrainConfig(model="builtin:tiny-qwen3", dataset="builtin:demo-preferences",
                      num_samples=64, max_length=64, output_dir=sys.argv[1])
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg, demo.resolve_model(cfg.model))
    train, evals = loaders.build_datasets(cfg, accelerator, tokenizer)
    out = {"calls": len(calls), "train": train.to_dict(), "eval": evals.to_dict()}
    with open(f"{sys.argv[1]}/rank{accelerator.process_index}.json", "w") as f:
        json.dump(out, f)
""")


@pytest.mark.slow
def test_every_process_after_the_first_loads_its_result(tmp_path):
    """Two processes under accelerate: the main one tokenizes (with its progress bar) and saves,
    the other loads the same pairs and never tokenizes."""
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    env = {**demo_env(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    out = run_launched([*ACCELERATE, "--multi_gpu", "--num_processes", "2", str(script),
                        str(tmp_path)], env, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["calls"] == 2 and other["calls"] == 0  # train and eval, on the main process
    assert other["train"] == main["train"] and other["eval"] == main["eval"]
    assert "tokenizing preference pairs" in out.stderr  # the progress bar is shown
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2
