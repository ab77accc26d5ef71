"""The best checkpoint (`dpo/train/best.py`): its settings' one-line errors, the tracker and the
pruning rule without a model, and `train.py` runs that keep, record, resume and save the best."""
import json
import math
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dpo.config import ConfigError, TrainConfig
from dpo.config.run import lower_is_better
from dpo.eval.model_card import model_card_text
from dpo.train.best import BestCheckpoint, to_prune
from dpo.train.checkpoint import checkpoints
from tests.e2e import ACCELERATE, demo_env, eval_logs, run_python, run_train

BEST = dict(metric_for_best_model="eval/loss", eval_steps=2, save_steps=4)


@pytest.mark.parametrize("settings, error", [
    (dict(load_best_model_at_end=True), "load_best_model_at_end needs metric_for_best_model"),
    (dict(greater_is_better=False), "greater_is_better needs metric_for_best_model"),
    (dict(metric_for_best_model="loss"), "'loss' is not an eval key; they start with eval/ "
                                         "(e.g. eval/loss)"),
    (dict(BEST, eval_steps=None), "set --eval-steps and --save-steps"),
    (dict(BEST, save_steps=None), "set --eval-steps and --save-steps"),
    (dict(BEST, save_steps=3), "save_steps (3) must be a multiple of eval_steps (2)"),
    (dict(BEST, eval_samples=0), "eval_samples is 0, so no eval pairs measure it"),
    (dict(BEST, metric_for_best_model="eval/win_rate"), "is logged only with a judge"),
    (dict(BEST, metric_for_best_model="eval/reward/policy"), "is logged only with a judge"),
    (dict(BEST, metric_for_best_model="eval/win_rate", judge="builtin:demo-rule",
          loss_type=["simpo"]), "compares with the reference's answers, but loss simpo has no "
                                "reference"),
])
def test_settings_that_cannot_pick_a_best_are_refused(settings, error):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**settings)
    assert error in str(e.value) and "\n" not in str(e.value)


def test_settings_that_can_pick_a_best():
    TrainConfig(**BEST, load_best_model_at_end=True, save_total_limit=1)
    TrainConfig(**dict(BEST, save_steps=2), greater_is_better=True)
    TrainConfig(**BEST | {"metric_for_best_model": "eval/win_rate"}, judge="builtin:demo-rule")


@pytest.mark.parametrize("metric, lower", [
    ("eval/loss", True), ("eval/aux_loss", True), ("eval/loss/sigmoid", True),
    ("eval/hh/loss", True), ("eval/rewards/accuracies", False), ("eval/win_rate", False),
    ("eval/rewards/margins", False)])
def test_lower_is_better_for_a_loss_by_default(metric, lower):
    assert lower_is_better(metric) is lower
    cfg = TrainConfig(**BEST | {"metric_for_best_model": metric}, judge="builtin:demo-rule")
    assert BestCheckpoint(cfg, has_eval=True).greater is (not lower)


def tracker(**settings) -> BestCheckpoint:
    return BestCheckpoint(TrainConfig(**BEST | settings), has_eval=True)


def test_only_saved_or_final_steps_compete_and_ties_keep_the_earlier():
    """Evals at 2, 4, 6, 8, 10; checkpoints at 4 and 8. Step 2's low loss has no checkpoint,
    so it does not compete; step 8 ties step 4 and the earlier one stays; the final step 10
    competes without a checkpoint."""
    best = tracker()
    for step, loss in ((2, 0.1), (4, 0.5), (6, 0.2), (8, 0.5)):
        best.observe(step, {"eval/loss": loss, "eval/x": step})
        if step % 4 == 0:
            state = best.on_save(step)
    assert (best.checkpoint_step, state["best_checkpoint"]) == (4, "checkpoint-4")
    assert state["best_metric"] == 0.5 and state["best_results"] == {"eval/loss": 0.5,
                                                                    "eval/x": 4}
    final = best.finish(None, Path("out"), 10, {"eval/loss": 0.4, "eval/x": 10})
    assert (final["best_step"], final["best_checkpoint"], final["step"]) == (10, None, 10)
    assert final["eval/x"] == 10 and best.checkpoint_step is None


def test_higher_is_better_and_nan_never_wins():
    best = tracker(metric_for_best_model="eval/rewards/accuracies")
    for step, value in ((4, math.nan), (8, 0.5), (12, 0.75), (16, 0.25)):
        best.observe(step, {"eval/rewards/accuracies": value})
        best.on_save(step)
    assert best.checkpoint_step == 12
    assert tracker().on_save(4)["best_step"] is None  # saved before any eval: no best yet


def test_a_missing_metric_is_one_line_listing_the_logged_keys():
    best = tracker(metric_for_best_model="eval/lost")
    with pytest.raises(ConfigError) as e:
        best.observe(2, {"eval/loss": 1.0, "eval/rewards/margins": 0.0})
    assert str(e.value) == ("metric_for_best_model eval/lost is not logged at eval; the eval "
                            "keys are eval/loss, eval/rewards/margins")
    with pytest.raises(ConfigError, match="the run has no eval pairs"):
        BestCheckpoint(TrainConfig(**BEST), has_eval=False)


def test_restore_goes_on_with_the_saved_best_and_refuses_another_rule():
    before = tracker()
    before.observe(4, {"eval/loss": 0.3})
    state = {"step": 8, **before.on_save(4)}
    after = tracker()
    after.restore(json.loads(json.dumps(state)))  # as trainer_state.json holds it
    assert after.best == before.best and after.checkpoint_step == 4
    with pytest.raises(ConfigError, match=r"chose the best by eval/loss \(lower is better\), "
                                          r"this one by eval/loss \(higher is better\)"):
        tracker(greater_is_better=True).restore(state)
    tracker(metric_for_best_model=None, eval_steps=None, save_steps=None).restore(state)


def test_pruning_keeps_the_best_beside_the_newest():
    found = [Path(f"checkpoint-{s}") for s in (1, 2, 3, 4, 5)]
    names = lambda paths: [p.name.split("-")[1] for p in paths]  # noqa: E731
    assert names(to_prune(found, 2)) == ["1", "2", "3"]
    assert names(to_prune(found, 2, found[1])) == ["1", "3", "4"]  # best + newest 1
    assert names(to_prune(found, 1, found[1])) == ["1", "3", "4"]  # best + the newest
    assert names(to_prune(found, 2, found[4])) == ["1", "2", "3"]  # best among the newest
    assert names(to_prune(found, 3, found[0])) == ["2", "3"]
    assert to_prune(found, None, found[0]) == []


def test_model_card_names_the_saved_step_the_metric_and_the_rule():
    cfg = TrainConfig(**BEST, load_best_model_at_end=True, max_steps=12)
    results = {"eval/loss": 0.25, "step": 4, "metric_for_best_model": "eval/loss",
               "greater_is_better": False, "best_metric": 0.25, "best_step": 4,
               "best_checkpoint": "checkpoint-4", "load_best_model_at_end": True}
    text = model_card_text(cfg, results, steps=12, train_rows=10, eval_rows=2, num_processes=1,
                           argv=["train.py"])
    for line in ("- Selection: `eval/loss`, lower is better (its default), compared at the evals "
                 "of the saved checkpoints (every 4 steps) and of the final step; a tie keeps "
                 "the earlier step.",
                 "- Best: step 4 (`checkpoint-4`), `eval/loss` = 0.2500",
                 "- Saved model: step 4, the best checkpoint's weights (`--load-best-model-at-end`)",
                 "## Evaluation (held-out pairs, step 4: the saved model's weights)"):
        assert line in text.splitlines(), line
    kept = model_card_text(cfg, {**results, "step": 12, "load_best_model_at_end": False},
                           steps=12, train_rows=10, eval_rows=2, num_processes=1, argv=["t"])
    assert ("- Saved model: step 12, the final step (without `--load-best-model-at-end`; the "
            "best is step 4)") in kept.splitlines()


# --- train.py end to end: 6 steps, an eval and a checkpoint at each ---------------------------

RUN = ["--model", "builtin:tiny-qwen3", "--dataset", "builtin:demo-preferences",
       "--num-samples", "64", "--eval-samples", "8", "--max-length", "64", "--batch-size", "2",
       "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--logging-steps", "1",
       "--num-sample-generations", "1", "--max-new-tokens", "4", "--seed", "3",
       "--max-steps", "6", "--eval-steps", "1", "--save-steps", "1", "--save-total-limit", "2",
       # Rises, then falls on this run: the best is an early step, which pruning must keep.
       "--metric-for-best-model", "eval/rewards/rejected", "--load-best-model-at-end"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return demo_env(tmp_path_factory.mktemp("dpo_cache"))


@pytest.fixture(scope="module")
def best_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("best") / "out"
    run_train(env, *RUN, "--output-dir", str(out))
    return out


def best_of(out: Path) -> tuple[int, float]:
    """The highest eval/rewards/rejected in metrics.jsonl (every step is saved), the earliest
    of a tie."""
    logs = eval_logs(out)
    top = max(log["eval/rewards/rejected"] for log in logs)
    return next(log["step"] for log in logs if log["eval/rewards/rejected"] == top), top


@pytest.mark.slow
def test_the_best_is_kept_recorded_and_saved_as_the_model(best_run):
    """save_total_limit 2 keeps the best and the newest; the last checkpoint's trainer state
    names the best; the saved model is the best checkpoint's weights; eval_results.json and the
    model card say which step it is."""
    step, value = best_of(best_run)
    assert step < 5, "the run must have its best among the pruned steps to test the pruning"
    kept = [p.name for p in checkpoints(best_run)]
    assert kept == [f"checkpoint-{step}", "checkpoint-6"]
    state = json.loads((best_run / "checkpoint-6" / "trainer_state.json").read_text())
    assert (state["best_step"], state["best_metric"]) == (step, value)
    assert state["best_checkpoint"] == f"checkpoint-{step}"
    saved = load_file(best_run / "model.safetensors")
    assert saved
    checkpoint = load_file(best_run / f"checkpoint-{step}" / "model.safetensors")
    last = load_file(best_run / "checkpoint-6" / "model.safetensors")
    assert all(saved[k].equal(checkpoint[k]) for k in saved)
    assert not all(saved[k].equal(last[k]) for k in saved)
    results = json.loads((best_run / "eval_results.json").read_text())
    logged = next(log for log in eval_logs(best_run) if log["step"] == step)
    assert results == {**{k: v for k, v in logged.items() if k != "step"}, "step": step,
                       "metric_for_best_model": "eval/rewards/rejected",
                       "greater_is_better": True, "best_metric": value, "best_step": step,
                       "best_checkpoint": f"checkpoint-{step}", "load_best_model_at_end": True}
    card = (best_run / "README.md").read_text()
    assert f"- Saved model: step {step}, the best checkpoint's weights" in card
    assert f"`eval/rewards/rejected` = {value:.4f}" in card


@pytest.mark.slow
def test_a_killed_and_resumed_run_keeps_the_same_best(env, best_run, tmp_path):
    """SIGKILL while checkpoint-5 is written (`tests/kill_during_save.py`), resume from
    checkpoint-4: the same checkpoints kept, the same best recorded, the same final model and
    results as the uninterrupted run."""
    out = tmp_path / "out"
    killed = run_python(["tests/kill_during_save.py", "5", "before-rename", *RUN,
                         "--output-dir", str(out)], env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in checkpoints(out)][-1] == "checkpoint-4"
    run_train(env, *RUN, "--output-dir", str(out), "--resume-from-checkpoint", "latest")
    assert [p.name for p in checkpoints(out)] == [p.name for p in checkpoints(best_run)]
    for name in ("eval_results.json", "checkpoint-6/trainer_state.json"):
        got, want = (json.loads((d / name).read_text()) for d in (out, best_run))
        got.pop("config", None), want.pop("config", None)  # output_dir, resume_from_checkpoint
        assert got == want, name
    saved, want = (load_file(d / "model.safetensors") for d in (out, best_run))
    assert saved.keys() == want.keys() and all(saved[k].equal(want[k]) for k in want)


@pytest.mark.slow
def test_with_lora_the_saved_adapter_is_the_best_checkpoints(env, tmp_path):
    """LoRA: the best checkpoint's adapter weights (in its full `save_state` state dict) are
    the saved adapter's."""
    out = tmp_path / "out"
    run_train(env, *RUN, "--lora-r", "8", "--lora-alpha", "16", "--output-dir", str(out))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == results["best_step"] != 6  # this run's best is an early step
    saved = load_file(out / "adapter_model.safetensors")
    for name, step in ((results["best_checkpoint"], True), ("checkpoint-6", False)):
        state = load_file(out / name / "model.safetensors")
        same = [state[k.removeprefix("base_model.model.").replace(".weight", ".default.weight")]
                .equal(w) for k, w in saved.items()]
        assert len(same) > 0 and all(same) if step else not all(same)


@pytest.mark.slow
@pytest.mark.parallel
def test_under_ddp_the_saved_model_is_the_best_checkpoints(env, tmp_path):
    """Two DDP processes (gloo, CPU): every process loads the best checkpoint back; the saved
    model is its weights. A metric that is never logged stops both processes at the first eval
    with the one line (no hang)."""
    ddp = [*ACCELERATE, "--multi_gpu", "--num_processes", "2"]
    typo = run_train(env, *RUN[:-3], "--metric-for-best-model", "eval/rewards/rejectd",
                     "--output-dir", str(tmp_path / "typo"), launcher=ddp, check=False)
    assert typo.returncode != 0 and "Traceback" not in typo.stderr
    assert typo.stderr.count("error: metric_for_best_model eval/rewards/rejectd is not logged "
                             "at eval; the eval keys are eval/logits/chosen, ") == 2
    out = tmp_path / "out"
    run_train(env, *RUN, "--output-dir", str(out), launcher=ddp)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == results["best_step"] != 6  # this run's best is an early step
    saved = load_file(out / "model.safetensors")
    best = load_file(out / results["best_checkpoint"] / "model.safetensors")
    assert saved and all(saved[k].equal(best[k]) for k in saved)


def test_evaluating_a_best_run_drops_its_best_settings(tmp_path):
    """`python -m dpo.evaluate` picks no checkpoint: a run's best settings do not stand in the
    way of flags that would refuse them (no judge for eval/win_rate), and the run's saved model
    is labelled with the step eval_results.json names, not the last step logged."""
    from dpo.evaluate import evaluate_config

    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(**BEST | {"metric_for_best_model": "eval/win_rate"}, judge="builtin:demo-rule",
                greater_is_better=True, load_best_model_at_end=True).to_yaml(
        run / "training_config.yaml")
    (run / "metrics.jsonl").write_text('{"step": 8, "eval/loss": 0.5}\n')
    (run / "eval_results.json").write_text('{"eval/loss": 0.4, "step": 4}')
    cfg, source = evaluate_config(["--model", str(run), "--judge", "none"])
    assert (cfg.metric_for_best_model, cfg.greater_is_better, cfg.judge) == (None, None, None)
    assert source.step == 4
