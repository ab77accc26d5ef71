"""`python -m dpo.evaluate`: a trained run's output dir or checkpoint gives the run's own eval
metrics; judged answers through a tiny reward model agree on 1 and 2 processes; a policy equal
to its reference wins half; bad inputs are one line each."""
import json
import math
import shutil

import pytest
import yaml

from tests.conftest import TINY_CHAT_TEMPLATE, _build_tiny_tokenizer
from tests.e2e import (ACCELERATE, PYTHON, demo_env, demo_run, free_port, read_metrics,
                       run_launched, run_python, run_train)
from tests.test_judges import save_reward_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return demo_env(tmp_path_factory.mktemp("dpo_cache"))


@pytest.fixture(scope="module")
def run():
    return demo_run()[0]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_tokenizer_json):
    tokenizer = _build_tiny_tokenizer(tiny_tokenizer_json, TINY_CHAT_TEMPLATE)
    return save_reward_model(tmp_path_factory.mktemp("rm") / "rm", tokenizer, seed=3)


def evaluate(env, *flags, launcher=PYTHON, check=True):
    if launcher == PYTHON:
        out = run_python(["-m", "dpo.evaluate", *flags], env)
    else:
        out = run_launched([*launcher, "-m", "dpo.evaluate", *flags], env)
    if check and out.returncode != 0:
        raise AssertionError(f"dpo.evaluate failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out


def results(directory):
    return json.loads((directory / "eval_results.json").read_text())


def assert_close(got: dict, want: dict, tol: float):
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert abs(got[key] - value) <= tol * max(abs(value), 1.0), (key, got[key], value)


def test_output_dir_gives_the_runs_final_eval(env, run, tmp_path):
    """The run's own settings and reference from its training_config.yaml: every `eval/` value
    of the end of training, the judged ones included, to 1e-6; the same table printed."""
    out = evaluate(env, "--model", str(run), "--output-dir", str(tmp_path / "eval"))
    final = results(run)
    assert "eval/win_rate" in final and "eval/rewards/accuracies" in final
    assert_close(results(tmp_path / "eval"), final, 1e-6)
    assert "held-out pairs      after" in out.stdout and "win_rate" in out.stdout
    assert "before (reference)" in out.stdout and "after (policy)" in out.stdout
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").open()]
    assert len(samples) == 64 and {"reward_policy", "reward_reference"} <= samples[0].keys()
    # Written beside the model by default, never into the run's own files.
    evaluate(env, "--model", str(run), "--eval-samples", "8", "--num-sample-generations", "2")
    assert results(run / "eval")["eval/win_rate"] >= 0
    assert results(run) == final


def test_checkpoint_gives_the_runs_eval_at_its_step(env, run, tmp_path):
    """A checkpoint-<step>: its weights in the run's model; the metrics of the run's eval at
    that step (metrics.jsonl)."""
    evaluate(env, "--model", str(run / "checkpoint-125"), "--output-dir", str(tmp_path))
    logged = next(log for log in read_metrics(run) if log["step"] == 125 and "eval/loss" in log)
    got = read_metrics(tmp_path)
    assert [log["step"] for log in got] == [125]
    assert_close(got[0], logged, 1e-6)


def test_lora_adapter_and_its_checkpoint_give_the_runs_evals(env, tmp_path):
    """An adapter output dir is compared with its base (the adapter off), as training compared
    it; a LoRA checkpoint's weights go into the run's model with its adapter."""
    run = tmp_path / "lora"
    run_train(env, "--model", "builtin:tiny-qwen3", "--dataset", "builtin:demo-preferences",
              "--num-samples", "32", "--eval-samples", "8", "--max-length", "64",
              "--max-steps", "4", "--batch-size", "4", "--gradient-accumulation-steps", "1",
              "--learning-rate", "1e-2", "--lora-r", "4", "--save-steps", "2", "--eval-steps",
              "2", "--num-sample-generations", "3", "--max-new-tokens", "8",
              "--judge", "builtin:demo-rule", "--output-dir", str(run))
    evaluate(env, "--model", str(run), "--output-dir", str(tmp_path / "final"))
    assert_close(results(tmp_path / "final"), results(run), 1e-6)
    assert results(run)["eval/rewards/margins"] != 0  # the adapter moved the policy
    evaluate(env, "--model", str(run / "checkpoint-2"), "--output-dir", str(tmp_path / "two"))
    logged = next(log for log in read_metrics(run) if log["step"] == 2 and "eval/loss" in log)
    assert_close(read_metrics(tmp_path / "two")[0], logged, 1e-6)


def test_reward_model_judge_on_one_and_two_processes(env, run, reward_model, tmp_path):
    """Each process generates and judges its share (7 prompts: 4 and 3), gathered in order:
    the same answers, scores and metrics as one process."""
    flags = ["--model", str(run), "--judge", str(reward_model), "--eval-samples", "12",
             "--num-sample-generations", "7", "--generation-batch-size", "2"]
    evaluate(env, *flags, "--output-dir", str(tmp_path / "one"))
    evaluate(env, *flags, "--output-dir", str(tmp_path / "two"),
             launcher=(*ACCELERATE, "--multi_gpu", "--num_processes", "2",
                       "--main_process_port", str(free_port())))
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert_close(two, one, 1e-5)
    assert one["eval/reward/policy"] != one["eval/reward/reference"]  # a real model's scores
    samples = [[json.loads(line) for line in (tmp_path / d / "samples.jsonl").open()]
               for d in ("one", "two")]
    assert [s["policy"] for s in samples[0]] == [s["policy"] for s in samples[1]]
    assert [s["prompt"] for s in samples[0]] == [s["prompt"] for s in samples[1]]
    for a, b in zip(*samples):
        assert a["reward_policy"] == pytest.approx(b["reward_policy"], rel=1e-5, abs=1e-6)


def test_policy_equal_to_reference_wins_half(env, run, reward_model, tmp_path):
    out = tmp_path / "same"
    evaluate(env, "--model", str(run), "--ref-model", str(run), "--judge", str(reward_model),
             "--eval-samples", "8", "--num-sample-generations", "5", "--output-dir", str(out))
    got = results(out)
    assert got["eval/win_rate"] == 0.5
    assert got["eval/reward/policy"] == got["eval/reward/reference"]
    assert got["eval/loss"] == pytest.approx(math.log(2), rel=1e-6)


def test_bad_inputs_are_one_line(env, run, tmp_path, tiny_tokenizer_json):
    def fails(*flags):
        out = evaluate(env, *flags, "--output-dir", str(tmp_path / "x"), check=False)
        assert out.returncode == 1, out.stderr[-2000:]
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith("error: "), out.stderr[-2000:]
        return line

    assert "no eval pairs" in fails("--model", str(run), "--eval-samples", "0")
    # A checkpoint whose run names another model (here: twice as wide) than it holds.
    other = tmp_path / "other-run"
    shutil.copytree(run / "checkpoint-125", other / "checkpoint-125")
    config = yaml.safe_load((run / "training_config.yaml").read_text())
    wide = tmp_path / "wide"
    _save_wide_model(wide)
    (other / "training_config.yaml").write_text(yaml.safe_dump({**config, "model": str(wide)}))
    line = fails("--model", str(other / "checkpoint-125"))
    assert "its weights are not those of" in line and "another model" in line
    # A reward model whose template refuses the conversation.
    tokenizer = _build_tiny_tokenizer(tiny_tokenizer_json, "{{ raise_exception('no chat') }}")
    refusing = save_reward_model(tmp_path / "refusing", tokenizer)
    line = fails("--model", str(run), "--judge", str(refusing), "--eval-samples", "4",
                 "--num-sample-generations", "2")
    assert "cannot render the conversation" in line and "no chat" in line
    assert "no such directory" in fails("--model", str(run), "--judge", str(tmp_path / "nope"),
                                        "--eval-samples", "4")
    assert "give --ref-model" in fails("--model", "builtin:tiny-qwen3",
                                       "--dataset", "builtin:demo-preferences")
    out = evaluate(env, "--model", "builtin:tiny-qwen3", "--ref-model", "builtin:tiny-qwen3",
                   check=False)
    assert out.stderr.strip().splitlines()[-1].startswith("error: output_dir: give --output-dir")


def _save_wide_model(directory):
    from transformers import AutoTokenizer

    from dpo import demo
    from dpo.demo.tiny import tiny_qwen3
    from tests.e2e import shared_chat_model

    tokenizer = AutoTokenizer.from_pretrained(shared_chat_model())
    config = {**demo.MODEL_CONFIG, "hidden_size": 128}
    tiny_qwen3(len(tokenizer), **config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_checkpoint_of_a_tied_model_loads(tmp_path):
    """A model whose LM head is its embedding saves the shared weight once (safetensors):
    loading such a checkpoint is no 'checkpoint from another model'."""
    import torch
    from safetensors.torch import save_model

    from dpo import evaluate as ev
    from dpo.config import TrainConfig
    from dpo.demo.tiny import tiny_qwen3

    base = tmp_path / "tied"
    tiny_qwen3(64, tie_word_embeddings=True).save_pretrained(base)
    trained = tiny_qwen3(64, seed=1, tie_word_embeddings=True)
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)
    save_model(trained, str(tmp_path / "run" / "checkpoint-1" / "model.safetensors"))
    cfg = TrainConfig(model=str(base), loss_type=["simpo"], output_dir=str(tmp_path / "run"))
    cfg.to_yaml(tmp_path / "run" / "training_config.yaml")
    (tmp_path / "run" / "checkpoint-1" / "trainer_state.json").write_text('{"step": 1}')
    source = ev.Source(str(tmp_path / "run" / "checkpoint-1"))
    source.trained = cfg
    policy, reference = ev.load_models(cfg, source, str(base))
    assert reference is None  # simpo: reference-free
    for name, tensor in trained.state_dict().items():
        assert torch.equal(policy.state_dict()[name], tensor), name
