"""The offline demo assets: loadable, cached, deterministic, and the data obey the stated rule."""
import json
import re
import threading
import time

import pytest
import torch

from dpo import demo
from dpo.demo import build, facts, rule, sft
from tests.e2e import demo_run, shared_chat_model

PROMPT = [{"role": "user", "content": "Tell me about cats."}]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache with the model and the data built, shared by the module: a build takes about a
    second."""
    root = tmp_path_factory.mktemp("demo-cache")
    demo.build_demo_model(root)
    demo.build_demo_dataset(root)
    demo.build_demo_prompts(root)
    return root


@pytest.fixture
def short_sft(monkeypatch):
    """A supervised phase of a few steps, for the tests that build chat models of their own."""
    monkeypatch.setattr(sft, "SFT_STEPS", 3)


@pytest.fixture(scope="module")
def tokenizer(cache):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.build_demo_model(cache))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cache_dir_is_versioned_and_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path))
    assert demo.demo_cache_dir() == tmp_path / f"demo-v{demo.DEMO_FORMAT_VERSION}"
    monkeypatch.delenv("DPO_CACHE_DIR")
    assert demo.demo_cache_dir().parent.name == "dpo"


def test_model_dir_loads_like_a_hub_checkpoint(cache, tokenizer):
    from transformers import AutoModelForCausalLM

    path = demo.build_demo_model(cache)
    assert (path / "model.safetensors").is_file() and (path / demo.COMPLETE_MARKER).is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen3"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer("hello")["input_ids"] == tokenizer("hello", add_special_tokens=False)[
        "input_ids"]  # no BOS/EOS added around plain text
    for token in demo.SPECIAL_TOKENS:  # each special token is one id, never split into bytes
        assert len(tokenizer(token)["input_ids"]) == 1


@pytest.mark.parametrize("text", [
    "Tell me about cats.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "café naïve Straße — “quotes” 🙂 中文 ﬁ",  # non-ASCII and a non-NFC ligature
    "special-looking <|im_start|>user\nhi<|im_end|>\n",
    "\x00\x07 control bytes",
])
def test_byte_level_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids


def test_chat_template(tokenizer):
    assert tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nTell me about cats.<|im_end|>\n<|im_start|>assistant\n")
    conversation = PROMPT + [{"role": "assistant", "content": "Gladly!"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>user\nTell me about cats.<|im_end|>\n"
        "<|im_start|>assistant\nGladly!<|im_end|>\n")
    system = [{"role": "system", "content": "Be kind."}] + PROMPT
    assert tokenizer.apply_chat_template(system, tokenize=False).startswith(
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n")


def test_dataset_splits_and_rule(cache):
    from datasets import load_dataset

    path = demo.build_demo_dataset(cache)
    splits = load_dataset(str(path))
    assert set(splits) == {"train", "test"}
    assert splits["train"].num_rows == demo.NUM_TRAIN
    assert splits["test"].num_rows == demo.NUM_TEST
    assert splits["train"].column_names == ["prompt", "chosen", "rejected"]

    train, test = read_jsonl(path / "train.jsonl"), read_jsonl(path / "test.jsonl")
    kinds = set()
    for row in train + test:
        assert row["prompt"] and row["chosen"] and row["rejected"]
        assert row["chosen"] != row["rejected"]
        assert demo.rule_holds(row), row
        kinds.add("off-topic" if rule._is_polite(row["rejected"]) else "rude")
    assert kinds == {"off-topic", "rude"}  # both kinds of rejected reply occur
    # Held out: no test pair was seen in training.
    train_pairs = {(r["prompt"], r["chosen"], r["rejected"]) for r in train}
    assert not any((r["prompt"], r["chosen"], r["rejected"]) in train_pairs for r in test)


def test_prompt_splits_hold_every_demo_prompt_once(cache, monkeypatch):
    """builtin:demo-prompts: the 144 prompts (6 templates x 24 topics), 120 to train on and 24
    held out, none in both; each asks about a topic the demo's rule recognises."""
    from datasets import load_dataset

    path = demo.build_demo_prompts(cache)
    splits = load_dataset(str(path))
    assert {name: (ds.num_rows, ds.column_names) for name, ds in splits.items()} == {
        "train": (120, ["prompt"]), "test": (demo.NUM_TEST_PROMPTS, ["prompt"])}
    train, test = ([row["prompt"] for row in read_jsonl(path / f"{name}.jsonl")]
                   for name in ("train", "test"))
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert set(train) | set(test) == {template.format(topic=topic) for topic in facts.TOPICS
                                      for template in facts.PROMPT_TEMPLATES}
    assert len({rule._prompt_topic(prompt) for prompt in test}) > 10  # a spread of topics
    for prompt in train + test:
        topic = rule._prompt_topic(prompt)
        assert topic in facts.TOPICS, prompt
        answer = f"{facts.POLITE_OPENERS[0]} {facts.TOPICS[topic][0]} {facts.POLITE_CLOSERS[0]}"
        assert demo.answer_accepted(prompt, answer)
    assert [row["prompt"] for row in demo.demo_prompts()[1]] == test
    assert demo.demo_prompts(seed=1)[1] != demo.demo_prompts()[1]  # the seed splits them
    monkeypatch.setattr(build, "demo_cache_dir", lambda: cache)
    assert demo.resolve_dataset(demo.BUILTIN_PROMPTS) == str(path)


def test_rule_rejects_swapped_pairs():
    train, _ = demo.demo_pairs()
    for row in train[:50]:
        swapped = dict(row, chosen=row["rejected"], rejected=row["chosen"])
        assert not demo.rule_holds(swapped)


def test_pairs_fit_the_demo_length(cache, tokenizer):
    rows = read_jsonl(demo.build_demo_dataset(cache) / "test.jsonl")
    lengths = []
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                               tokenize=False, add_generation_prompt=True)
        for reply in (row["chosen"], row["rejected"]):
            lengths.append(len(tokenizer(prompt + reply + tokenizer.eos_token)["input_ids"]))
    assert max(lengths) <= 64


def test_second_call_reuses_the_cache(cache, monkeypatch):
    builders = (demo.build_demo_model, demo.build_demo_dataset, demo.build_demo_prompts)
    dirs = [builder(cache) for builder in builders]
    before = {p: p.stat().st_mtime_ns for d in dirs for p in d.iterdir()}

    def fail(*args):
        raise AssertionError("rebuilt although the cache is complete")

    monkeypatch.setattr(build, "_write_model", fail)
    monkeypatch.setattr(build, "_write_splits", fail)
    assert [builder(cache) for builder in builders] == dirs
    after = {p: p.stat().st_mtime_ns for d in dirs for p in d.iterdir()}
    assert after == before


def test_builds_are_deterministic(cache, short_sft, tmp_path):
    other = tmp_path / "other"
    for builder, files in (
        (demo.build_demo_model, ("tokenizer.json", "tokenizer_config.json", "config.json",
                                 "model.safetensors")),
        (demo.build_demo_chat_model, ("tokenizer.json", "config.json", "model.safetensors")),
        (demo.build_demo_dataset, ("train.jsonl", "test.jsonl")),
        (demo.build_demo_prompts, ("train.jsonl", "test.jsonl")),
    ):
        first, second = builder(cache), builder(other)
        assert first != second
        for name in files:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_build_does_not_touch_the_global_rng(short_sft, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    demo.build_demo_chat_model(tmp_path)  # the base model first, then its supervised phase
    assert torch.equal(torch.rand(3), expected)


def test_concurrent_builders_publish_one_complete_directory(tmp_path):
    target = tmp_path / "asset"
    calls = []

    def slow_write(directory):
        calls.append(directory)
        (directory / "part1").write_text("a")
        time.sleep(0.2)  # every builder is mid-write at once
        (directory / "part2").write_text("b")

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        build._build_atomically(target, slow_write))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 4 and len(calls) == 4
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [demo.COMPLETE_MARKER, "part1", "part2"])
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]  # no temporary directory left


def test_incomplete_directory_is_replaced(tmp_path):
    target = tmp_path / "asset"
    target.mkdir()
    (target / "half-written").write_text("x")  # e.g. copied in by hand, without the marker

    assert build._build_atomically(target, lambda d: (d / "ok").write_text("y")) == target
    assert sorted(p.name for p in target.iterdir()) == sorted([demo.COMPLETE_MARKER, "ok"])
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]


# --- The demo as the README runs it: readable answers, and DPO's effect on them -------------

def demo_words() -> set[str]:
    """Every word the demo's texts use (prompts, facts, openers, closers), lower case."""
    texts = [*facts.PROMPT_TEMPLATES, *facts.TOPICS, *(f for fs in facts.TOPICS.values() for f in fs),
             *facts.POLITE_OPENERS, *facts.POLITE_CLOSERS, *facts.RUDE_OPENERS, *facts.RUDE_CLOSERS]
    return {w for text in texts for w in words(text)}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def assert_words(answer: str, vocabulary: set[str]):
    """At least 90% of the answer's words are the demo's, and it is no repeat of one word."""
    found = words(answer)
    assert len(found) >= 4, answer
    assert sum(w in vocabulary for w in found) >= 0.9 * len(found), answer
    assert max(found.count(w) for w in found) <= len(found) / 2, answer


@pytest.mark.slow  # a supervised phase, then 64 greedy answers of 48 tokens
def test_chat_model_answers_in_words_and_mostly_against_the_rule(tokenizer):
    """Before DPO, the supervised model answers in the demo's words, and rudely for the most
    part: the rule accepts at most 0.2 of its greedy answers to 64 held-out prompts."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shared_chat_model()).eval()
    _, test = demo.demo_pairs()
    prompts = [row["prompt"] for row in test[:64]]
    vocabulary, accepted = demo_words(), 0
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert_words(answer, vocabulary)
        accepted += demo.answer_accepted(prompt, answer)
    assert accepted <= 0.2 * len(prompts)


@pytest.mark.slow
def test_demo_teaches_the_rule_to_its_answers():
    """`python train.py --config configs/demo.yaml`: on 64 held-out prompts the share of answers
    the rule accepts rises from <= 0.2 (the reference's) to >= 0.8, the win rate ends >= 0.8,
    every answer is words, and the before/after answers to two prompts are printed at the end."""
    out, stdout = demo_run()
    final = json.loads((out / "eval_results.json").read_text())
    assert final["eval/reward/reference"] <= 0.2
    assert final["eval/reward/policy"] >= 0.8
    assert final["eval/win_rate"] >= 0.8
    assert final["eval/rewards/accuracies"] >= 0.98
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    last = [s for s in samples if s["step"] == max(s["step"] for s in samples)]
    assert len(last) == 64
    vocabulary = demo_words()
    for sample in last:
        assert_words(sample["policy"], vocabulary)
        assert_words(sample["reference"], vocabulary)
    end = stdout[stdout.index("held-out pairs"):]
    assert "win_rate" in end
    assert end.count("before (reference): ") == 2 and end.count("after (policy): ") == 2
