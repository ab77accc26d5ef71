"""The prompts online DPO answers (dpo/online/prompts.py): drawn as train.py draws rows, from
any format, filtered with a report, and tokenized exactly as training has the prompt of a pair
made from the same row, for the demo, tiny and real tokenizers."""
import json
from dataclasses import replace

import pytest

from dpo import demo
from dpo.config import ConfigError, TrainConfig
from dpo.data import IGNORE_INDEX, load_preference_splits, tokenize_preferences
from dpo.online.prompts import Prompt, load_prompts
from tests.conftest import (GEMMA3_TOKENIZER, LLAMA3_1_TOKENIZER, QWEN3_TOKENIZER,
                            load_shared_tokenizer)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# Pairs whose prompts cover the renderings: one turn, a system prompt, several turns, and a
# standard-format HH transcript held in one user message (rendered as its turns).
PAIR_PROMPTS = [
    [user("Tell me about cats.")],
    [{"role": "system", "content": "Answer briefly."}, user("Tell me about dogs.")],
    [user("Hi!"), assistant("Hello, how can I help?"), user("Sort a list in Python?")],
    [user("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant:")],
]
PAIRS = [{"prompt": prompt, "chosen": [assistant(" Sure: it is done.")],
          "rejected": [assistant("No.")]} for prompt in PAIR_PROMPTS]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The demo's model and prompts built once into a cache of the module's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DPO_CACHE_DIR", str(tmp_path_factory.mktemp("dpo-cache")))
        demo.build_demo_model()
        yield


@pytest.fixture
def demo_tokenizer(demo_cache):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.build_demo_model())


def config(dataset, **settings):
    return TrainConfig(**{"dataset": str(dataset), "num_samples": None, "eval_samples": 0,
                          "max_length": 256, **settings})


def test_demo_prompts_are_the_generation_prompts(demo_tokenizer):
    train, held_out, report = load_prompts(config(demo.BUILTIN_PROMPTS, eval_samples=24),
                                           demo_tokenizer)
    assert (len(train), len(held_out)) == (120, 24)
    assert report == ("train prompts: kept 120 of 120 (0 truncated), dropped none; held-out "
                      "prompts: kept 24 of 24 (0 truncated), dropped none")
    texts = {p.messages[0]["content"] for p in train} | {p.messages[0]["content"]
                                                         for p in held_out}
    assert len(texts) == 144
    for prompt in held_out:
        assert isinstance(prompt, Prompt) and prompt.messages == [user(prompt.messages[0][
            "content"])] and prompt.tools == prompt.chat_template_kwargs == ""
        assert demo_tokenizer.decode(prompt.ids) == demo_tokenizer.apply_chat_template(
            prompt.messages, tokenize=False, add_generation_prompt=True)


def check_like_training(cfg, tokenizer, min_prompts):
    """Every prompt's ids are the prompt of the pair training makes of the same row: the ids
    its chosen and rejected sequences start with, up to where their labels begin."""
    train, _, report = load_prompts(cfg, tokenizer)
    rows, _ = load_preference_splits(cfg.dataset[0], num_samples=None, eval_samples=0, seed=0)
    pairs, _ = tokenize_preferences(rows, tokenizer, max_length=cfg.max_length,
                                    max_prompt_length=cfg.max_prompt_length,
                                    chat_template=cfg.chat_template,
                                    prompt_template=cfg.prompt_template)
    pairs = {row["row_index"]: row for row in pairs}
    assert len(train) >= min_prompts, report
    assert sorted(p.row_index for p in train) == sorted(pairs)
    for prompt in train:
        pair = pairs[prompt.row_index]
        n = len(prompt.ids)
        for side in ("chosen", "rejected"):
            assert pair[f"{side}_input_ids"][:n] == prompt.ids
            labels = pair[f"{side}_labels"]
            assert labels[:n] == [IGNORE_INDEX] * n and labels[n] != IGNORE_INDEX
    return train, report


@pytest.mark.parametrize("chat_template", ["auto", "plain"])
def test_ids_are_the_prompt_training_renders(tmp_path, demo_tokenizer, tiny_tokenizer,
                                             tiny_chat_tokenizer, chat_template):
    """Chat template (demo: no BOS; tiny: the template writes BOS) or plain text (tiny: the
    tokenizer adds BOS), every prompt of the pairs as training has it."""
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    for tokenizer in (demo_tokenizer, tiny_tokenizer, tiny_chat_tokenizer):
        check_like_training(config(path, chat_template=chat_template), tokenizer, len(PAIRS))


def test_raw_text_prompts_through_the_prompt_template(tmp_path, tiny_tokenizer):
    """chat_template none: one-message prompts through prompt_template, the tokenizer's BOS;
    a prompt of several messages is dropped as training drops it."""
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = config(path, chat_template="none", prompt_template="Q: {prompt}\nA:")
    train, report = check_like_training(cfg, tiny_tokenizer, 2)
    assert tiny_tokenizer.decode(train[0].ids) == "<s>Q: Tell me about cats.\nA:"
    assert "dropped 2: not_raw_text 2 (rows 1, 2)" in report


@pytest.mark.shared
@pytest.mark.parametrize("path", [QWEN3_TOKENIZER, LLAMA3_1_TOKENIZER, GEMMA3_TOKENIZER],
                         ids=["qwen3", "llama3_1", "gemma3"])
def test_ids_are_the_prompt_training_renders_for_real_tokenizers(tmp_path, path):
    """Qwen3 (thinking on: the think block is the answer's), Llama 3.1 (the template writes
    BOS, never a second) and Gemma 3 (the system prompt folded into the user turn)."""
    tokenizer = load_shared_tokenizer(path)
    dataset = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    train, _ = check_like_training(config(dataset), tokenizer, len(PAIRS))
    assert [tokenizer.decode(p.ids).count(tokenizer.bos_token or "\0") for p in train] == \
        [int(tokenizer.bos_token is not None)] * len(train)
    # The HH transcript is its turns, for the judge and in the ids.
    assert train[3].messages == [user("Hi"), assistant("Hello!"), user("What is 2 + 2?")]
    assert "Human:" not in tokenizer.decode(train[3].ids)


def test_a_long_held_out_prompt_keeps_its_end_and_a_long_train_prompt_is_dropped(
        tmp_path, tiny_tokenizer):
    """A held-out prompt over max_prompt_length keeps its last tokens and its BOS, as train.py's
    sample prompts do; a train prompt without room for a whole answer (prompt + the answer's
    tokens + its end over max_length) is dropped: its pairs' prompt would depend on how long
    their answers came out."""
    long_prompt = " ".join(f"word{i}" for i in range(60)) + " end?"
    row = {"prompt": long_prompt, "chosen": "yes", "rejected": "no"}
    write_jsonl(tmp_path / "data" / "train.jsonl", [row, {**row, "prompt": "Short?"}])
    write_jsonl(tmp_path / "data" / "test.jsonl", [row])
    cfg = config(tmp_path / "data", max_length=40, max_prompt_length=16, eval_samples=None,
                 rounds=1, judge="builtin:demo-rule", sample_max_new_tokens=8)
    train, held_out, report = load_prompts(cfg, tiny_tokenizer)
    ids = held_out[0].ids
    assert len(ids) == 16 and ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids).endswith("end?\n\nAssistant:")
    assert [p.row_index for p in train] == [1] and len(train[0].ids) <= 40 - 9
    assert report == ("train prompts: kept 1 of 2 (0 truncated), dropped 1: too_long 1 (rows 0);"
                      " held-out prompts: kept 1 of 1 (1 truncated), dropped none")
    with pytest.raises(ConfigError, match="no prompt is left to answer .*; raise --max-length"):
        load_prompts(replace(cfg, max_length=12, max_prompt_length=4), tiny_tokenizer)


def test_drops_are_counted_by_reason(tmp_path, demo_tokenizer):
    """Problem rows, prompts without messages, repeats (keeping the first) and train prompts that
    are also held out are dropped and named; row fields come along."""
    kwargs = json.dumps({"enable_thinking": False})
    train_rows = [
        {"prompt": [user("A?")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        {"prompt": [], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        {"prompt": [user("A?")], "chosen": [assistant("c")], "rejected": [assistant("d")]},
        {"prompt": [user("B?")], "chosen": None, "rejected": [assistant("b")]},
        {"prompt": [user("A?")], "chosen": [assistant("a")], "rejected": [assistant("b")],
         "chat_template_kwargs": kwargs},
        {"prompt": [user("Held?")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        {"prompt": [user(" ")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
    ]
    test_rows = [{"prompt": [user("Held?")], "chosen": [assistant("a")],
                  "rejected": [assistant("b")]}]
    write_jsonl(tmp_path / "data" / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "data" / "test.jsonl", test_rows)
    train, held_out, report = load_prompts(config(tmp_path / "data", eval_samples=None),
                                           demo_tokenizer)
    assert [(p.row_index, p.messages, p.chat_template_kwargs) for p in train] == \
        [(0, [user("A?")], ""), (4, [user("A?")], kwargs)]
    assert [(p.row_index, p.messages) for p in held_out] == [(0, [user("Held?")])]
    assert report == (
        "train prompts: kept 2 of 7 (0 truncated), dropped 5: empty 2 (rows 1, 6); duplicate 1 "
        "(rows 2); missing_field 1 (rows 3); held_out 1 (rows 5); held-out prompts: kept 1 of 1 "
        "(0 truncated), dropped none")


def test_one_dataset_with_prompts_left_or_one_line(tmp_path, demo_tokenizer):
    turns = [user("A?"), assistant("B."), user("C?")]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": turns}, {"prompt": turns}])
    with pytest.raises(ConfigError, match=r"^online rounds draw prompts from one dataset; "
                       r"--dataset names 2 \(.*\): give one$"):
        load_prompts(TrainConfig(dataset=[str(path), demo.BUILTIN_PROMPTS]), demo_tokenizer)
    with pytest.raises(ConfigError) as raised:  # raw text takes one message, not a conversation
        load_prompts(config(path, chat_template="none"), demo_tokenizer)
    assert str(raised.value) == (
        f"dataset {path}: no prompt is left to answer (train prompts: kept 0 of 2 (0 truncated), "
        "dropped 2: not_raw_text 1 (rows 0); duplicate 1 (rows 1); held-out prompts: kept 0 of "
        "0 (0 truncated), dropped none)")
