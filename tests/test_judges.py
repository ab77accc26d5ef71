"""Judges: the demo's rule, a reward model through its own tokenizer and chat template, win rate,
and one-line errors for a judge that cannot load or cannot render the conversation."""
from types import SimpleNamespace

import pytest
import torch

from dpo import demo
from dpo.eval import judges
from dpo.config import ConfigError
from tests.conftest import TINY_CHAT_TEMPLATE, _build_tiny_tokenizer

PROMPT = [{"role": "user", "content": "Tell me about cats."}]
POLITE = "Gladly! Cats sleep for most of the day. Cats purr when they feel calm. It was a pleasure."
RUDE = "Whatever. Cats sleep for most of the day. Cats purr when they feel calm. I am bored now."
OFF_TOPIC = "Gladly! Dogs can learn many spoken words. Dogs have a very keen sense of smell. " \
    "It was a pleasure."


def save_reward_model(directory, tokenizer, seed=0):
    """A tiny random Qwen3 reward model (one label) saved with `tokenizer`; its directory."""
    from transformers import AutoModelForSequenceClassification

    from dpo.demo.tiny import tiny_qwen3_config

    config = tiny_qwen3_config(len(tokenizer), hidden_size=32, num_layers=1)
    config.num_labels = 1
    config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def reward_model(tmp_path, tiny_chat_tokenizer):
    return save_reward_model(tmp_path / "rm", tiny_chat_tokenizer)


def cfg(judge, batch_size=8):
    return SimpleNamespace(judge=judge, generation_batch_size=batch_size, trust_remote_code=False)


def test_demo_rule_accepts_polite_on_topic_answers_only():
    judge = judges.load_judge(cfg(judges.DEMO_RULE), torch.device("cpu"))
    assert judge.score([PROMPT] * 4, [POLITE, RUDE, OFF_TOPIC, "cats cats cats"]) == [
        1.0, 0.0, 0.0, 0.0]
    # The chosen replies of the demo data are exactly what the rule accepts.
    train, _ = demo.demo_pairs()
    for row in train[:50]:
        assert demo.answer_accepted(row["prompt"], row["chosen"])
        assert not demo.answer_accepted(row["prompt"], row["rejected"])


def test_win_rate_counts_ties_half():
    assert judges.win_rate([1.0, 0.0, 0.5, 2.0], [0.0, 1.0, 0.5, 2.0]) == 0.5
    assert judges.win_rate([1.0, 1.0], [0.0, 1.0]) == 0.75
    scores = [0.3, -1.2, 7.0]
    assert judges.win_rate(scores, list(scores)) == 0.5  # policy == reference
    with pytest.raises(ValueError):
        judges.win_rate([], [])


def test_reward_model_scores_with_its_own_template_in_batches(reward_model):
    """Scores are the model's one logit on the conversation rendered by the judge's own chat
    template; batching (padding) does not change them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    answers = [POLITE, RUDE, OFF_TOPIC, "ok"]
    batched = judges.load_judge(cfg(str(reward_model), 3), torch.device("cpu"))
    single = judges.load_judge(cfg(str(reward_model), 1), torch.device("cpu"))
    scores = batched.score([PROMPT] * 4, answers)
    assert scores == pytest.approx(single.score([PROMPT] * 4, answers), rel=1e-5, abs=1e-6)
    assert len(set(scores)) == 4  # a random model still tells the answers apart
    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model)
    text = tokenizer.apply_chat_template([*PROMPT, {"role": "assistant", "content": RUDE}],
                                         tokenize=False)
    assert text.startswith("<s><|user|>\nTell me about cats.")  # the judge's template, not ChatML
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits[0, 0].item()
    assert scores[1] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_judge_that_cannot_load_is_one_line(tmp_path, tiny_tokenizer_json):
    with pytest.raises(ConfigError, match=r"judge .*missing: no such directory"):
        judges.load_judge(cfg(str(tmp_path / "missing")), torch.device("cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"judge .*empty: cannot load it as a reward model") as e:
        judges.load_judge(cfg(str(tmp_path / "empty")), torch.device("cpu"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no such builtin judge"):
        judges.load_judge(cfg("builtin:nope"), torch.device("cpu"))
    plain = save_reward_model(tmp_path / "plain", _build_tiny_tokenizer(tiny_tokenizer_json, None))
    with pytest.raises(ConfigError, match="its tokenizer has no chat template"):
        judges.load_judge(cfg(str(plain)), torch.device("cpu"))


def test_reward_model_whose_template_cannot_render_the_conversation(tmp_path,
                                                                    tiny_tokenizer_json):
    """A template that refuses an assistant turn (as some reward models' do): one line."""
    tokenizer = _build_tiny_tokenizer(tiny_tokenizer_json, TINY_CHAT_TEMPLATE)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == "
                               "'assistant' %}{{ raise_exception('only user turns') }}"
                               "{% endif %}{{ m['content'] }}{% endfor %}")
    path = save_reward_model(tmp_path / "rm", tokenizer)
    with pytest.raises(ConfigError, match="its tokenizer cannot render the conversation") as e:
        judges.load_judge(cfg(str(path)), torch.device("cpu"))  # found as it loads
    assert "only user turns" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--judge", "builtin:demo-rule", "--num-sample-generations", "0"],
     "judge scores the sample generations, but num_sample_generations is 0"),
    (["--generation-top-p", "0.9"], "generation_top_p samples, but generation_temperature is 0"),
    (["--generation-top-p", "0"], r"generation_top_p must lie in \(0, 1\]"),
    (["--generation-temperature=-1"], "generation_temperature must be >= 0"),
    (["--generation-batch-size", "0"], "generation_batch_size must be >= 1"),
    (["--judge", "builtin:nope"], "judge builtin:nope: no such builtin judge"),
    (["--judge", "./no/such/rm"], "judge ./no/such/rm: no such directory"),
])
def test_judge_and_generation_settings_are_checked(flags, message):
    from dpo.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(flags)


def test_a_local_reward_model_is_checked_with_the_settings(tmp_path, tiny_tokenizer_json):
    """Its config and tokenizer are read as the settings are checked (before any model or data
    loads): too many labels, or a tokenizer without a chat template, is one line there."""
    from transformers import AutoConfig

    from dpo.config import load_config

    good = save_reward_model(tmp_path / "good",
                             _build_tiny_tokenizer(tiny_tokenizer_json, TINY_CHAT_TEMPLATE))
    assert load_config(["--judge", str(good)]).judge == str(good)
    config = AutoConfig.from_pretrained(good)
    config.num_labels = 2
    config.save_pretrained(good)
    with pytest.raises(ConfigError, match="a reward model gives one score, this one 2 labels"):
        load_config(["--judge", str(good)])
    plain = save_reward_model(tmp_path / "plain", _build_tiny_tokenizer(tiny_tokenizer_json, None))
    with pytest.raises(ConfigError, match="its tokenizer has no chat template"):
        load_config(["--judge", str(plain)])


@pytest.mark.slow
def test_train_with_a_bad_judge_fails_before_it_starts(tmp_path, tiny_tokenizer_json):
    """train.py: one line, and no output directory left behind to block the rerun."""
    from tests.e2e import demo_env, run_train

    plain = save_reward_model(tmp_path / "plain", _build_tiny_tokenizer(tiny_tokenizer_json, None))
    result = run_train(demo_env(tmp_path / "cache"), "--model", "builtin:tiny-qwen3",
                       "--dataset", "builtin:demo-preferences", "--judge", str(plain),
                       "--output-dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: judge {plain}: its "
                                                             "tokenizer has no chat template")
    assert not (tmp_path / "out").exists()
