"""The best checkpoint: `--metric-for-best-model` names an eval key, and the run keeps track of
the step whose weights scored best on it, keeps that checkpoint when pruning, and with
`--load-best-model-at-end` saves its weights as the final model.

The rule. Every eval's value of the metric is noted. A step competes when its weights can be had
back: a checkpoint saved at a step that was evaluated (with `save_steps` a multiple of
`eval_steps`, every periodic one), and the final step, whose weights are the model in memory at
the end. An eval at a step without a checkpoint cannot be loaded back, so it does not compete.
A step becomes the best only when strictly better than the best so far (a tie keeps the earlier
one, as transformers' Trainer does); a NaN never does. Every checkpoint's `trainer_state.json`
records the best so far, so a resumed run goes on with the same best.
"""
from __future__ import annotations

import math
from pathlib import Path

from accelerate import Accelerator

from dpo.config import ConfigError, TrainConfig
from dpo.config.run import lower_is_better


class BestCheckpoint:
    """Which step is best by `metric_for_best_model`; inert without it."""

    def __init__(self, cfg: TrainConfig, has_eval: bool):
        self.metric = cfg.metric_for_best_model
        self.greater = (None if self.metric is None else cfg.greater_is_better
                        if cfg.greater_is_better is not None else not lower_is_better(self.metric))
        self.load_at_end = cfg.load_best_model_at_end
        if self.metric and not has_eval:
            raise ConfigError(f"metric_for_best_model {self.metric}: the run has no eval pairs to "
                              "measure it on; give eval rows, or drop metric_for_best_model")
        self.best: dict | None = None  # value, step, checkpoint (its name, or None), results
        self.last: tuple[int, dict] | None = None  # the latest eval: (step, results)
        self.saved_step: int | None = None  # the latest checkpoint's

    @property
    def checkpoint_step(self) -> int | None:
        """The step of the best checkpoint, which pruning keeps; None before there is one."""
        return self.best["step"] if self.best and self.best["checkpoint"] else None

    def observe(self, step: int, results: dict) -> None:
        """Note an eval's results; ConfigError (alike on every process: the results are
        gathered) when they lack the metric, listing the keys they have."""
        if self.metric is None:
            return
        if self.metric not in results:
            raise ConfigError(f"metric_for_best_model {self.metric} is not logged at eval; the "
                              f"eval keys are {', '.join(sorted(results)) or 'none'}")
        self.last = (step, results)

    def _compete(self, step: int, checkpoint: str | None) -> None:
        """Let `step` compete, if it was evaluated (the latest eval is at `step`)."""
        if self.last is None or self.last[0] != step:
            return
        value = self.last[1][self.metric]
        if math.isnan(value):
            return
        if self.best is None or (value > self.best["value"] if self.greater
                                 else value < self.best["value"]):
            self.best = dict(value=value, step=step, checkpoint=checkpoint,
                             results=self.last[1])

    def on_save(self, step: int) -> dict:
        """Call as `checkpoint-<step>` is saved: the best so far, which its trainer state
        records ({} without a metric)."""
        if self.metric is None:
            return {}
        self.saved_step = step
        self._compete(step, f"checkpoint-{step}")
        best = self.best or {}
        return {"metric_for_best_model": self.metric, "greater_is_better": self.greater,
                "best_metric": best.get("value"), "best_step": best.get("step"),
                "best_checkpoint": best.get("checkpoint"), "best_results": best.get("results")}

    def restore(self, state: dict) -> None:
        """Go on from a checkpoint's trainer state (`on_save`'s fields). ConfigError where that
        run chose by another metric or direction: its best would mean something else."""
        self.saved_step = state["step"]
        if self.metric is None or state.get("metric_for_best_model") is None:
            return
        then = (state["metric_for_best_model"], state["greater_is_better"])
        if then != (self.metric, self.greater):
            raise ConfigError(
                f"cannot resume: the checkpoint's run chose the best by {_rule(*then)}, this one "
                f"by {_rule(self.metric, self.greater)}; keep metric_for_best_model and "
                "greater_is_better, or start a new run in another --output-dir")
        if state["best_step"] is not None:
            self.best = dict(value=state["best_metric"], step=state["best_step"],
                             checkpoint=state["best_checkpoint"], results=state["best_results"])

    def finish(self, accelerator: Accelerator, output_dir: Path, step: int,
               results: dict) -> dict:
        """After the final eval (`results`, at `step`): the final step competes, and with
        `load_best_model_at_end` the best checkpoint's weights are loaded into the model (all
        processes: `accelerator.load_state`, sharded or not). Returns the eval results of the
        weights that will be saved, with their `step` and the best's fields."""
        if self.metric is None:
            return results
        self.observe(step, results)
        self._compete(step, f"checkpoint-{step}" if self.saved_step == step else None)
        best, saved = self.best or {}, (step, results)
        if self.load_at_end and best and best["step"] != step:
            path = output_dir / best["checkpoint"]
            if not path.is_dir():
                raise ConfigError(f"load_best_model_at_end: {path}, the best by "
                                  f"{_rule(self.metric, self.greater)}, is gone; no final model "
                                  "was saved (the checkpoints hold the run)")
            accelerator.load_state(str(path))
            accelerator.print(f"load_best_model_at_end: loaded {best['checkpoint']} "
                              f"({self.metric} {best['value']:.4g}); the saved model is step "
                              f"{best['step']}'s, not the final step's ({step})")
            saved = (best["step"], best["results"])
        elif self.load_at_end and not best:
            accelerator.print(f"warning: load_best_model_at_end: no eval gave {self.metric} a "
                              "value (all NaN); the final step's weights are saved")
        return {**saved[1], "step": saved[0], "metric_for_best_model": self.metric,
                "greater_is_better": self.greater, "best_metric": best.get("value"),
                "best_step": best.get("step"), "best_checkpoint": best.get("checkpoint"),
                "load_best_model_at_end": self.load_at_end}


def _rule(metric: str, greater: bool) -> str:
    return f"{metric} ({'higher' if greater else 'lower'} is better)"


def to_prune(found: list[Path], limit: int | None, best: Path | None = None) -> list[Path]:
    """Which of the checkpoints `found` (oldest first) `save_total_limit` removes: all but the
    newest `limit`, except `best`, which is never removed: when it is not among the newest
    `limit` it is kept with the newest `limit - 1` (with the newest one when `limit` is 1), as
    transformers' Trainer keeps it."""
    if not limit:
        return []
    kept = found[-limit:]
    if best in found and best not in kept:
        kept = [best, *found[-max(limit - 1, 1):]]
    return [path for path in found if path not in kept]
