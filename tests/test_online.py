"""Online DPO (`train.py --rounds`, dpo/online/): pairs from judged answers, the round settings,
and end to end the demo's rise, resume after a kill in each phase, and 2 processes = 1."""
import json
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpo.config import ConfigError, load_config
from dpo.online import pairs
from dpo.online.rounds import Rounds

DEMO = ["--config", "configs/online_demo.yaml"]


# --- Pairs and what a round measures ----------------------------------------------------------

def test_best_and_worst_take_the_first_of_equal_scores_and_skip_ties():
    assert pairs.best_and_worst([0.0, 1.0, 1.0, 0.0]) == (1, 0)
    assert pairs.best_and_worst([-2.5, 3.0, -7.0]) == (1, 2)
    assert pairs.best_and_worst([1.0, 1.0]) is None
    assert pairs.best_and_worst([0.3] * 5) is None


def prompt(text, tools="", kwargs=""):
    return SimpleNamespace(messages=[{"role": "user", "content": text}], tools=tools,
                           chat_template_kwargs=kwargs, row_index=7)


def samples(*texts, tokens=None, finished=None):
    return [SimpleNamespace(text=t, num_tokens=(tokens or [len(t)] * len(texts))[i],
                            finished=(finished or [True] * len(texts))[i])
            for i, t in enumerate(texts)]


def records():
    return [pairs.group_record(prompt("a?"), samples("x", "yy", "zzz", tokens=[2, 4, 6],
                                                     finished=[True, False, True]),
                               [0.0, 1.0, 0.5]),
            pairs.group_record(prompt("b?", tools='[{"name": "f"}]', kwargs='{"k": 1}'),
                               samples("p", "q", "r", tokens=[1, 3, 5]), [2.0, 2.0, -1.0]),
            pairs.group_record(prompt("c?"), samples("s", "t", "u", tokens=[1, 1, 1]),
                               [1.0, 1.0, 1.0])]


def test_a_group_record_names_its_pair_or_none():
    first, second, tied = records()
    assert (first["chosen"], first["rejected"]) == (1, 0)
    assert first["answers"] == ["x", "yy", "zzz"] and first["finished"] == [True, False, True]
    assert (second["chosen"], second["rejected"]) == (0, 2)
    assert (tied["chosen"], tied["rejected"]) == (None, None)


def test_pair_rows_are_conversational_pairs_with_the_rows_tools_and_options():
    rows = pairs.pair_rows(records())
    assert rows == [
        {"prompt": [{"role": "user", "content": "a?"}],
         "chosen": [{"role": "assistant", "content": "yy"}],
         "rejected": [{"role": "assistant", "content": "x"}]},
        {"prompt": [{"role": "user", "content": "b?"}],
         "chosen": [{"role": "assistant", "content": "p"}],
         "rejected": [{"role": "assistant", "content": "r"}],
         "tools": [{"name": "f"}], "chat_template_kwargs": {"k": 1}}]


def test_round_metrics_by_hand():
    got = pairs.round_metrics(records(), lambda s: s >= 1.0)
    scores = [0.0, 1.0, 0.5, 2.0, 2.0, -1.0, 1.0, 1.0, 1.0]
    mean = sum(scores) / 9
    assert got["samples/score/mean"] == pytest.approx(mean)
    assert got["samples/score/std"] == pytest.approx(
        (sum((s - mean) ** 2 for s in scores) / 9) ** 0.5)
    assert got["samples/acceptance"] == pytest.approx(6 / 9)
    assert got["samples/length"] == pytest.approx(24 / 9)
    assert got["samples/unfinished"] == pytest.approx(1 / 9)
    assert (got["pairs/kept"], got["pairs/skipped_tied"]) == (2, 1)
    assert got["pairs/length/chosen"] == pytest.approx((4 + 1) / 2)
    assert got["pairs/length/rejected"] == pytest.approx((2 + 5) / 2)
    assert got["pairs/score_gap"] == pytest.approx((1.0 + 3.0) / 2)
    assert "samples/acceptance" not in pairs.round_metrics(records(), lambda s: None)


def test_the_table_of_rounds_shows_what_was_measured():
    start = {"round": 0, "heldout/acceptance": 0.0, "heldout/win_rate": 0.5,
             "heldout/length": 23.42}
    first = {**start, "round": 1, "heldout/acceptance": 0.25, "heldout/win_rate": 0.625,
             "samples/acceptance": 0.3, "pairs/kept": 88, "pairs/length/chosen": 25.04,
             "pairs/length/rejected": 24.66}
    assert pairs.table([start, first]).splitlines() == [
        "round  held-out: acceptance win rate  length  samples: acceptance pairs  "
        "chosen/rejected length",
        "0                0.000      0.500     23.4",
        "1                0.250      0.625     23.4             0.300      88     25.0 / 24.7"]
    unjudged = {k: v for k, v in first.items() if not k.startswith("heldout/")}
    assert pairs.table([{"round": 0}, unjudged]).splitlines()[1:] == [
        "0                -          -         -",
        "1                -          -         -                0.300      88     25.0 / 24.7"]


# --- Settings ----------------------------------------------------------------------------------

ONLINE = ["--rounds", "2", "--judge", "builtin:demo-rule", "--dataset", "builtin:demo-prompts"]


@pytest.mark.parametrize("flags, message", [
    (["--samples-per-prompt", "1"], "a pair needs two answers"),
    (["--sample-temperature", "0"], "every answer to a prompt is the same"),
    (["--sample-top-p", "0"], "sample_top_p must lie in (0, 1]"),
    (["--judge", "none"], "online DPO needs --judge"),
    (["--metric-for-best-model", "eval/loss"], "metric_for_best_model is not a setting"),
    (["--dataset", "a.jsonl", "b.jsonl"], "from one dataset"),
    (["--resume-from-checkpoint", "out/checkpoint-3"], "use latest"),
    (["--prompts-per-round", "0"], "prompts_per_round must be >= 1"),
])
def test_bad_online_settings_are_refused_in_one_line(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config([*ONLINE, *flags])


def test_online_settings_without_rounds_are_refused():
    with pytest.raises(ConfigError, match="samples_per_prompt is a setting of online DPO"):
        load_config(["--samples-per-prompt", "8"])
    with pytest.raises(ConfigError, match="reference_update is a setting of online DPO"):
        load_config(["--reference-update", "per-round"])


def test_acceptance_is_the_demo_rules_or_a_threshold():
    assert load_config(ONLINE).accepts(1.0) is True
    assert load_config(ONLINE).accepts(0.0) is False
    judge = ["--judge", "tests/judge_functions.py:length_score"]
    assert load_config([*ONLINE, *judge]).accepts(3.0) is None
    assert load_config([*ONLINE, *judge, "--acceptance-threshold", "2"]).accepts(2.0) is True


def rounds_of(flags, tmp_path, prompts=10):
    cfg = load_config([*ONLINE, "--output-dir", str(tmp_path), *flags])
    loop = Rounds.__new__(Rounds)  # no accelerator, judge or model: the settings only
    loop.cfg, loop.out, loop.start_path = cfg, tmp_path, "/start"
    loop.train_prompts = list(range(prompts))
    return loop


def test_prompts_per_round_take_the_shuffled_prompts_in_turn(tmp_path):
    assert rounds_of([], tmp_path).prompts_of(3) == list(range(10))
    loop = rounds_of(["--prompts-per-round", "4"], tmp_path)
    first, second, third = (loop.prompts_of(r) for r in (1, 2, 3))
    assert sorted(first + second + third[:2]) == list(range(10))  # each once, then again
    assert third[2:] == first[:2] and first != sorted(first)
    assert loop.prompts_of(2) == second  # the same every time: a resumed round draws them again


@pytest.mark.parametrize("update, r, reference", [
    ("fixed", 1, None), ("fixed", 2, "/start"), ("per-round", 1, None), ("per-round", 3, None)])
def test_a_rounds_training_settings(tmp_path, update, r, reference):
    loop = rounds_of(["--reference-update", update, "--split", "train[:50%]", "--num-samples",
                      "40"], tmp_path)
    cfg = loop.round_config(r, "/policy", tmp_path / f"round-{r}")
    assert cfg.rounds is None and cfg.judge is None and cfg.eval_samples == 0
    assert cfg.model == "/policy" and cfg.ref_model == reference
    assert cfg.dataset == [str(tmp_path / f"round-{r}" / "pairs.jsonl")]
    assert cfg.split == ["train"] and cfg.num_samples is None and cfg.seed == 42 + r
    assert cfg.output_dir == str(tmp_path / f"round-{r}" / "train")
    assert cfg.resume_from_checkpoint is None and cfg.overwrite_output_dir
    (tmp_path / f"round-{r}" / "train" / "checkpoint-2").mkdir(parents=True)
    cfg = loop.round_config(r, "/policy", tmp_path / f"round-{r}")
    assert cfg.resume_from_checkpoint == "latest" and not cfg.overwrite_output_dir


def test_a_given_reference_model_stays_the_fixed_reference(tmp_path):
    loop = rounds_of(["--ref-model", "/sft"], tmp_path)
    assert loop.round_config(3, "/policy", tmp_path / "round-3").ref_model == "/sft"
    loop = rounds_of(["--ref-model", "/sft", "--reference-update", "per-round"], tmp_path)
    assert loop.round_config(1, "/start", tmp_path / "round-1").ref_model == "/sft"
    assert loop.round_config(2, "/policy", tmp_path / "round-2").ref_model is None


# --- End to end: the demo, resume, processes, bad input --------------------------------------

# A checkpoint every 3 steps for the kill test (saving changes no number).
SAVING = ["--save-steps", "3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.e2e import chat_model_cache, demo_env

    return demo_env(chat_model_cache(tmp_path_factory.mktemp("online_cache")))


@pytest.fixture(scope="module")
def run(env, tmp_path_factory):
    """The README's online demo, `configs/online_demo.yaml`: four rounds, uninterrupted."""
    from tests.e2e import run_train

    out = tmp_path_factory.mktemp("online") / "out"
    result = run_train(env, "--config", "configs/online_demo.yaml", "--output-dir", str(out))
    return out, result.stdout


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_demo_lifts_acceptance_round_by_round(run):
    """From the rude chat model, with no preference data: the rule accepts more of the policy's
    sampled answers each round, and more of its held-out answers than the start's."""
    out, stdout = run
    rows = metrics(out)
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4]
    sampled = [row["samples/acceptance"] for row in rows[1:]]
    assert sampled == sorted(sampled) and len(set(sampled)) == 4, sampled
    assert rows[-1]["heldout/acceptance"] >= rows[0]["heldout/acceptance"] + 0.5
    assert rows[-1]["heldout/win_rate"] > 0.5 == rows[0]["heldout/win_rate"]
    assert "round  held-out: acceptance" in stdout
    for row in rows[1:]:  # what a round reports: scores, pairs, lengths
        assert row["pairs/kept"] + row["pairs/skipped_tied"] == 120
        assert {"samples/score/std", "pairs/length/chosen", "pairs/length/rejected",
                "heldout/length"} <= set(row)


@pytest.mark.slow
def test_a_rounds_files_hold_its_answers_scores_and_pairs(run):
    from dpo.demo import answer_accepted
    from tests.e2e import weights_equal

    out, _ = run
    records = lines(out / "round-1" / "samples.jsonl")
    assert len(records) == 120 and all(len(r["answers"]) == 4 for r in records)
    for r in records:  # the judge's scores, and its pair the best against the worst
        user = r["prompt"][-1]["content"]
        assert r["scores"] == [float(answer_accepted(user, a)) for a in r["answers"]]
        assert (r["chosen"] is None) == (len(set(r["scores"])) == 1)
    kept = [r for r in records if r["chosen"] is not None]
    assert pairs.pair_rows(records) == lines(out / "round-1" / "pairs.jsonl")
    assert len(kept) == metrics(out)[1]["pairs/kept"]
    assert weights_equal(out, out / "round-4" / "train")  # the last round's model is the run's


@pytest.mark.slow
def test_kill_9_in_training_then_resume_ends_as_the_uninterrupted_run(env, run, tmp_path):
    """Killed while round 3 trains: the resumed run takes rounds 1-2 as they are, resumes round
    3 from its checkpoint, and ends with the uninterrupted run's answers, metrics and weights."""
    from tests.e2e import Started, run_train, weights_equal
    from tests.test_checkpoint import wait_for

    reference, _ = run
    out = tmp_path / "out"
    proc = Started(["train.py", *DEMO, *SAVING, "--output-dir", str(out)], env)
    wait_for(proc, "round 3:")  # round 3's answers are judged; its training starts
    wait_for_file(proc, out / "round-3" / "train" / "checkpoint-3")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "round-3" / "metrics.json").exists()
    run_train(env, *DEMO, *SAVING, "--output-dir", str(out), "--resume-from-checkpoint", "latest")
    assert_same_run(out, reference, rounds=(3, 4))
    assert weights_equal(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["sampling", "held-out"])
def test_an_interrupted_phase_restarts_with_the_same_results(env, run, tmp_path, phase):
    """What a kill leaves in the other phases (a round without its samples; a trained round
    without its held-out answers): the resumed run makes them again, equal."""
    from tests.e2e import run_train

    reference, _ = run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    gone = (["samples.jsonl", "pairs.jsonl", "train", "heldout.jsonl", "metrics.json"]
            if phase == "sampling" else ["heldout.jsonl", "metrics.json"])
    for name in gone:
        path = out / "round-4" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_train(env, *DEMO, "--output-dir", str(out), "--resume-from-checkpoint", "latest")
    assert_same_run(out, reference, rounds=(4,))


def assert_same_run(out: Path, reference: Path, rounds) -> None:
    assert metrics(out) == metrics(reference)
    for r in rounds:
        for name in ("samples.jsonl", "pairs.jsonl", "heldout.jsonl"):
            assert lines(out / f"round-{r}" / name) == lines(reference / f"round-{r}" / name)


def wait_for_file(proc, path: Path, timeout=300):
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


LAUNCHERS = {"ddp": ["--multi_gpu"],
             "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "true"]}


@pytest.mark.slow
@pytest.mark.parallel
@pytest.mark.parametrize("layout", LAUNCHERS)
def test_two_processes_sample_what_one_does(env, run, tmp_path, layout):
    """Each process answers its share of the prompts; gathered, they are one process's. Under
    ZeRO-3 too, where each process holds the policy whole to sample and the processes generate
    in lockstep (a process out of prompts repeats a batch and drops its answers)."""
    from tests.e2e import ACCELERATE, run_train

    reference, _ = run
    out = tmp_path / "out"
    run_train(env, *DEMO, "--rounds", "1", "--output-dir", str(out),
              launcher=[*ACCELERATE, *LAUNCHERS[layout], "--num_processes", "2"])
    for name in ("round-0/heldout.jsonl", "round-1/samples.jsonl", "round-1/pairs.jsonl"):
        assert lines(out / name) == lines(reference / name), name


@pytest.mark.slow
@pytest.mark.parametrize("judge, message", [
    ("fails_on_cats", "error: judge tests/judge_functions.py:fails_on_cats"),
    ("same_score", "error: round 1: no usable pair"),
])
def test_a_judge_that_fails_or_tells_nothing_apart_stops_in_one_line(env, tmp_path, judge,
                                                                     message):
    from tests.e2e import run_train

    result = run_train(env, *DEMO, "--rounds", "1", "--output-dir", str(tmp_path / "out"),
                       "--judge", f"tests/judge_functions.py:{judge}", check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last


@pytest.mark.slow
@pytest.mark.parametrize("flags, reference", [
    (["--lora-r", "4"], "start"),
    (["--lora-r", "4", "--reference-update", "per-round"], None),
    (["--loss-type", "kto"], "start"),
    (["--loss-type", "orpo"], "start"),
    (["--precompute-ref-logps", "--reference-update", "per-round"], None),
    (["--eval-samples", "0"], "start"),
])
def test_rounds_train_with_trainpy_losses_and_options(env, tmp_path, flags, reference):
    """A round's training is train.py's with the run's settings: LoRA (the last round's adapter
    is the run's output), KTO on the pairs made unpaired, ORPO, a precomputed reference; round
    2's reference is the start model (fixed) or round 1's policy (per-round: none given, the
    policy's own start)."""
    import yaml

    from tests.e2e import run_train

    out = tmp_path / "out"
    run_train(env, *DEMO, "--rounds", "2", "--prompts-per-round", "16", "--epochs", "1",
              "--output-dir", str(out), *flags)
    assert [row["round"] for row in metrics(out)] == [0, 1, 2]
    settings = yaml.safe_load((out / "round-2" / "train" / "training_config.yaml").read_text())
    assert settings["model"] == str(out / "round-1" / "train")
    if reference == "start":
        assert Path(settings["ref_model"]).name == "tiny-qwen3-chat"
    else:
        assert settings["ref_model"] is None
    if "--eval-samples" in flags:  # no held-out prompts: no held-out metric
        assert not any(key.startswith("heldout/") for row in metrics(out) for key in row)
    lora = "--lora-r" in flags
    assert (out / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()


@pytest.mark.slow
def test_a_reward_model_judges_the_rounds(env, tmp_path):
    """A reward model (tiny, random, reading the answers through its own chat template): its
    scores rank the answers, every prompt makes a pair, and the rounds report scores (no
    acceptance without a threshold; with one, the share at or above it)."""
    from transformers import AutoTokenizer

    from dpo import demo
    from tests.e2e import run_train
    from tests.test_judges import save_reward_model

    chat = Path(env["DPO_CACHE_DIR"]) / f"demo-v{demo.DEMO_FORMAT_VERSION}" / \
        demo.CHAT_MODEL_DIR_NAME
    judge = save_reward_model(tmp_path / "rm", AutoTokenizer.from_pretrained(chat))
    out = tmp_path / "out"
    result = run_train(env, *DEMO, "--rounds", "1", "--prompts-per-round", "16", "--output-dir",
                       str(out), "--judge", str(judge), "--acceptance-threshold", "0")
    start, first = metrics(out)
    assert first["pairs/kept"] == 16 and first["pairs/skipped_tied"] == 0
    scores = [s for r in lines(out / "round-1" / "samples.jsonl") for s in r["scores"]]
    assert len(set(scores)) > 32  # a reward model's real-valued scores
    assert first["samples/acceptance"] == pytest.approx(sum(s >= 0 for s in scores) / 64)
    assert "heldout/score" in start and "round  held-out: acceptance" in result.stdout


def test_a_finished_round_is_written_and_logged_to_the_trackers(tmp_path):
    """Its `metrics.json` (the round done), `metrics.jsonl` of every round so far, and the
    trackers with the round as the step; round 0 (the start) with round 1."""
    logged = []
    loop = rounds_of([], tmp_path)
    loop.accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None,
                                       log=lambda row, step: logged.append((step, row)))
    rows = [{"round": 0, "heldout/score": 0.0}, {"round": 1, "heldout/score": 0.5}]
    loop.publish(rows)
    rows.append({"round": 2, "heldout/score": 1.0})
    loop.publish(rows)
    assert logged == [(row["round"], row) for row in rows]
    assert metrics(tmp_path) == rows
    assert [json.loads((tmp_path / f"round-{r}" / "metrics.json").read_text())
            for r in range(3)] == rows


def test_nodes_that_do_not_share_the_output_directory_are_refused(tmp_path, monkeypatch):
    """Every process reads back what the main process writes: a node-local output directory
    (`detect_shared_output_dir` false, as train.py's multi-node tests find it) stops at start."""
    from dpo.online import rounds

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    monkeypatch.setattr(rounds, "make_accelerator", lambda cfg: accelerator)
    monkeypatch.setattr(rounds.checkpoint, "detect_shared_output_dir",
                        lambda acc, out: acc is accelerator and out == tmp_path / "out" and False)
    cfg = load_config([*ONLINE, "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match="is not shared by all nodes; online DPO"):
        rounds.run_online(cfg, tmp_path / "out", train=None)
