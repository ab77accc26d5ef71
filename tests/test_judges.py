"""Judges: the demo's rule, a reward model through its own tokenizer and chat template, a user's
function by its import path, win rate, and one-line errors for a judge that cannot load or cannot
render the conversation, and for scores that are not one finite number per answer."""
import json
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


# --- A function as the judge, and checked scores -----------------------------------------------

JUDGES_PY = '''
received = []


def length(prompts, answers):
    received.append((prompts, answers))
    return [float(len(answer)) for answer in answers]


def polite(prompts, answers):
    return [answer.startswith("Gladly") for answer in answers]  # bools: 1 or 0
'''


def test_a_function_judge_by_module_path_or_file_path(tmp_path, monkeypatch):
    """`package.module:function` imports the module; `path/to/file.py:function` (relative to the
    working directory) runs the file: either function gets the prompt messages and the answers,
    and its scores (a bool as 1 or 0) are read through `checked_scores`."""
    from dpo.config import load_config

    (tmp_path / "judging_module_for_tests.py").write_text(JUDGES_PY)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rule.py").write_text(JUDGES_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    by_module = judges.load_judge(cfg("judging_module_for_tests:length"), torch.device("cpu"))
    assert isinstance(by_module, judges.FunctionJudge)
    assert by_module.name == "judging_module_for_tests:length"
    assert judges.checked_scores(by_module, [PROMPT] * 2, ["abc", POLITE], what="x") == [
        3.0, float(len(POLITE))]
    import judging_module_for_tests

    assert judging_module_for_tests.received == [([PROMPT] * 2, ["abc", POLITE])]
    assert load_config(["--judge", "sub/rule.py:polite"]).judge == "sub/rule.py:polite"
    by_file = judges.load_judge(cfg("sub/rule.py:polite"), torch.device("cpu"))
    assert by_file.name == "sub/rule.py:polite"
    assert judges.checked_scores(by_file, [PROMPT] * 2, [POLITE, RUDE], what="x") == [1.0, 0.0]


@pytest.mark.parametrize("judge, message", [
    ("no_such_module_for_judges:score", "cannot import no_such_module_for_judges "
     r"\(ModuleNotFoundError: No module named 'no_such_module_for_judges'\)"),
    ("dpo.demo.rule:nope", "dpo.demo.rule has no attribute 'nope'"),
    ("dpo.demo.rule:OFF_TOPIC_FRACTION", "dpo.demo.rule:OFF_TOPIC_FRACTION is a float, not a "
     "function"),
    ("missing/judge.py:score", "no such file missing/judge.py"),
    ("raising.py:score", r"cannot import raising.py \(RuntimeError: no GPU here\)"),
    ("dpo.demo.rule:", "give a function as package.module:function"),
])
def test_a_function_judge_that_cannot_be_found_is_one_line(tmp_path, monkeypatch, judge,
                                                           message):
    """Checked with the settings, before anything loads, and again as the judge loads."""
    from dpo.config import load_config

    (tmp_path / "raising.py").write_text("raise RuntimeError('no GPU here\\nat line 1')\n")
    monkeypatch.chdir(tmp_path)
    for check in (lambda: load_config(["--judge", judge]),
                  lambda: judges.load_judge(cfg(judge), torch.device("cpu"))):
        with pytest.raises(ConfigError, match=f"^judge {judge}: {message}") as e:
            check()
        assert "\n" not in str(e.value)


def scorer(score):
    return SimpleNamespace(name="my:judge", score=score)


def checked(score, answers, first=0):
    return judges.checked_scores(scorer(score), [PROMPT] * len(answers), answers,
                                 what="round 2 samples", first=first)


def test_a_judge_that_raises_is_one_line_naming_the_answer():
    """The call raised: the answers are scored one at a time to name the one at fault, counted
    from `first`, its text cut short."""
    def score(prompts, answers):
        if any("bad" in answer for answer in answers):
            raise ValueError("cannot score this\nTraceback ...")
        return [1.0] * len(answers)

    bad = "a bad answer " + "x" * 100
    with pytest.raises(judges.JudgeError) as e:
        checked(score, ["fine", "fine", bad, "bad too"], first=10)
    message = str(e.value)
    assert message == (f"judge my:judge on round 2 samples, answer 12 ({repr(bad)[:60]}...) "
                       "raised ValueError: cannot score this")
    assert isinstance(e.value, ConfigError)  # train.py prints it as "error: ..."

    def only_alone(prompts, answers):
        if len(answers) > 1:
            raise MemoryError("too many at once")
        return [0.0]

    with pytest.raises(judges.JudgeError, match=r"on round 2 samples: raised MemoryError: too "
                       "many at once on all 3 answers at once, on none alone"):
        checked(only_alone, ["a", "b", "c"])


@pytest.mark.parametrize("scores, message", [
    ([1.0, 2.0], "gave 2 scores for 3 answers"),
    ([1.0, float("nan"), 0.0], r"answer 1 \('b'\) got the score nan, not a finite number"),
    ([1.0, 2.0, float("-inf")], r"answer 2 \('c'\) got the score -inf, not a finite number"),
    ([1.0, "0.5", 0.0], r"answer 1 \('b'\) got the score '0.5', not a finite number"),
    ([None, 1.0, 0.0], r"answer 0 \('a'\) got the score None, not a finite number"),
    (torch.tensor([1.0, 2.0, 3.0]), "gave a Tensor, not a list of 3 scores"),
])
def test_scores_that_are_not_one_finite_number_per_answer_are_refused(scores, message):
    with pytest.raises(judges.JudgeError, match="^judge my:judge on round 2 samples" + r".*"
                       + message):
        checked(lambda prompts, answers: scores, ["a", "b", "c"])


def test_numbers_of_any_real_type_are_scores():
    """ints, bools (0 and 1) and numpy floats are read as floats; no answers, no call."""
    import numpy as np

    assert checked(lambda p, a: (2, True, np.float32(0.5)), ["a", "b", "c"]) == [2.0, 1.0, 0.5]
    assert checked(lambda p, a: 1 / 0, []) == []


def test_a_judges_config_error_passes_through():
    """A reward model's template that cannot render raises its own one-line ConfigError."""
    def refuse(prompts, answers):
        raise ConfigError("judge rm: its tokenizer cannot render the conversation")

    with pytest.raises(ConfigError) as e:
        checked(refuse, ["a"])
    assert type(e.value) is ConfigError and str(e.value).startswith("judge rm: its tokenizer")


def test_eval_scores_are_checked_and_name_the_answer_in_the_whole_list():
    """`judge_answers`: the second of 2 processes scores answers 3 and 4 of 5; a bad score on
    its second is answer 4."""
    from dpo.eval.evaluation import judge_answers

    second = SimpleNamespace(num_processes=2, process_index=1)
    scores = judge_answers(second, scorer(lambda p, a: [len(x) for x in a]), [PROMPT] * 5,
                           ["a", "bb", "ccc", "dddd", "eeeee"], "the policy's sample answers")
    assert scores == [4.0, 5.0]
    with pytest.raises(judges.JudgeError, match=r"on the policy's sample answers at step 3, "
                       r"answer 4 \('e'\) got the score nan"):
        judge_answers(second, scorer(lambda p, a: [0.0, float("nan")]), [PROMPT] * 5,
                      ["a", "b", "c", "d", "e"], "the policy's sample answers at step 3")


@pytest.mark.slow
def test_train_with_a_function_judge(tmp_path):
    """train.py scores the sample answers with a file's function; one that raises stops the run
    with one line naming the answer."""
    from tests.e2e import demo_env, read_metrics, run_train

    (tmp_path / "judge.py").write_text("def length(prompts, answers):\n"
                                       "    return [len(answer) for answer in answers]\n"
                                       "def broken(prompts, answers):\n"
                                       "    raise KeyError('role')\n")
    flags = ["--model", "builtin:tiny-qwen3", "--dataset", "builtin:demo-preferences",
             "--num-samples", "8", "--eval-samples", "4", "--max-steps", "1",
             "--num-sample-generations", "3", "--max-new-tokens", "4"]
    env = demo_env(tmp_path / "cache")
    run_train(env, *flags, "--judge", f"{tmp_path}/judge.py:length",
              "--output-dir", str(tmp_path / "out"))
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").open()]
    assert [s["reward_policy"] for s in samples] == [float(len(s["policy"])) for s in samples]
    logged = next(log for log in read_metrics(tmp_path / "out") if "eval/win_rate" in log)
    assert logged["eval/reward/policy"] == sum(s["reward_policy"] for s in samples) / 3
    result = run_train(env, *flags, "--judge", f"{tmp_path}/judge.py:broken",
                       "--output-dir", str(tmp_path / "broken"), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: judge {tmp_path}/judge.py:broken on the policy's sample answers at step 1, "
        "answer 0 (")
    assert result.stderr.strip().endswith("raised KeyError: 'role'")
