"""The run section: the seed, what is logged and where to, checkpoints, and the output
directory."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from dpo.config.fields import ConfigError, _opt, check_at_least
from dpo.loss import needs_reference

# Eval keys that only a judge logs (`dpo.eval.evaluation.Evaluator.judged`); those naming the
# reference also need one (a reference-free loss has no reference answers).
JUDGED_PREFIXES = ("eval/win_rate", "eval/reward/", "eval/length/")
BESIDE_REFERENCE = ("eval/win_rate", "eval/reward/reference", "eval/length/reference")


@dataclass
class RunSection:
    """run and output: seed, logging, checkpoints, the output directory"""

    seed: int = _opt(42, "seed for data order, sampling and initialisation")
    logging_steps: int = _opt(10, "log metrics every N optimizer steps")
    save_steps: int | None = _opt(None, "save a resumable checkpoint every N optimizer steps")
    save_total_limit: int | None = _opt(None, "keep only the newest N checkpoints (and the "
                                        "best, with metric_for_best_model)")
    metric_for_best_model: str | None = _opt(None, "the eval key that picks the best checkpoint "
                                             "(e.g. eval/loss, eval/win_rate, "
                                             "eval/<dataset>/rewards/accuracies); needs "
                                             "eval_steps and save_steps a multiple of it")
    greater_is_better: bool | None = _opt(None, "whether a higher metric_for_best_model is "
                                          "better; default: no for a loss (a key with a part "
                                          "ending in 'loss'), yes otherwise")
    load_best_model_at_end: bool = _opt(False, "save the best checkpoint's weights as the final "
                                        "model, not the last step's")
    resume_from_checkpoint: str | None = _opt(None, "a checkpoint directory, or 'latest'")
    report_to: str = _opt("none", "tracker", choices=("none", "tensorboard", "wandb"))
    output_dir: str = _opt("outputs/dpo_qwen_trl", "where checkpoints, metrics and the model go")
    overwrite_output_dir: bool = _opt(False, "delete a non-empty output_dir first")

    def _validate_run(self) -> None:
        check_at_least(self, 1, "logging_steps", "save_steps", "save_total_limit")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ConfigError(f"report_to: {self.report_to} is not installed; "
                              f"pip install {self.report_to}, or use --report-to none")


def lower_is_better(metric: str) -> bool:
    """The default direction of `metric`: lower for a loss, a key with a part ending in `loss`
    (`eval/loss`, `eval/aux_loss`, `eval/loss/sigmoid`, `eval/<dataset>/loss`), higher else."""
    return any(part.endswith("loss") for part in metric.split("/")[1:])


def check_best_model(cfg) -> None:
    """ConfigError for a best-checkpoint setting that cannot work: the metric is measured at
    each eval and compared at each checkpoint, so checkpoints must fall on eval steps."""
    metric = cfg.metric_for_best_model
    if metric is None:
        given = [name for name, value in (("load_best_model_at_end", cfg.load_best_model_at_end),
                                          ("greater_is_better", cfg.greater_is_better is not None))
                 if value]
        if given:
            raise ConfigError(f"{given[0]} needs metric_for_best_model, the eval key that picks "
                              "the best checkpoint (e.g. eval/loss)")
        return
    if not metric.startswith("eval/") or metric == "eval/":
        raise ConfigError(f"metric_for_best_model: {metric!r} is not an eval key; they start "
                          f"with eval/ (e.g. eval/{metric.strip('/') or 'loss'})")
    if cfg.eval_samples == 0:
        raise ConfigError(f"metric_for_best_model {metric}: eval_samples is 0, so no eval pairs "
                          "measure it; give eval rows, or drop metric_for_best_model")
    if cfg.eval_steps is None or cfg.save_steps is None:
        raise ConfigError(f"metric_for_best_model {metric} compares the checkpoints by their "
                          "evals: set --eval-steps and --save-steps (a multiple of it)")
    if cfg.save_steps % cfg.eval_steps:
        raise ConfigError(f"save_steps ({cfg.save_steps}) must be a multiple of eval_steps "
                          f"({cfg.eval_steps}) with metric_for_best_model: a checkpoint is "
                          "compared by the eval at its step")
    if metric.startswith(JUDGED_PREFIXES) and cfg.judge is None:
        raise ConfigError(f"metric_for_best_model {metric} is logged only with a judge: set "
                          "--judge (e.g. builtin:demo-rule), or choose another metric")
    if metric in BESIDE_REFERENCE and not needs_reference(cfg.loss_type):
        raise ConfigError(f"metric_for_best_model {metric} compares with the reference's "
                          f"answers, but loss {' + '.join(cfg.loss_type)} has no reference")
