"""The evaluation section: when eval runs and on how many pairs at a time, and the sample
answers that policy and reference generate for a judge to score (`dpo.eval.judges`)."""
from __future__ import annotations

from dataclasses import dataclass

from dpo.config.fields import ConfigError, _opt, check_at_least
from dpo.config.judge import check_judge


@dataclass
class EvaluationSection:
    """evaluation: eval metrics, and the scored sample generations of policy and reference"""

    eval_steps: int | None = _opt(None, "evaluate every N optimizer steps (and always at the end)")
    eval_on_start: bool = _opt(False, "also evaluate before the first step (the 'before' numbers)")
    eval_batch_size: int | None = _opt(None, "pairs per device for eval; default batch_size")
    num_sample_generations: int = _opt(2, "eval prompts answered by policy and reference")
    max_new_tokens: int = _opt(64, "length of those sample generations")
    generation_temperature: float = _opt(0.0, "sampling temperature of the sample generations; "
                                         "0 = greedy")
    generation_top_p: float = _opt(1.0, "nucleus sampling's top-p of the sample generations "
                                   "(with a temperature > 0)")
    judge: str | None = _opt(None, "scores the sample answers (eval/reward/*, eval/win_rate): "
                             "a reward model's directory or hub name (any "
                             "AutoModelForSequenceClassification, its own tokenizer and chat "
                             "template), builtin:demo-rule (the demo's polite+on-topic rule), "
                             "or a function (prompts, answers) -> scores as package.module:function "
                             "or path/to/file.py:function")
    generation_batch_size: int = _opt(8, "prompts per sample-generation batch, and answers "
                                      "per judge forward")

    def _validate_evaluation(self) -> None:
        check_at_least(self, 1, "eval_steps", "eval_batch_size", "max_new_tokens",
                       "generation_batch_size")
        check_at_least(self, 0, "num_sample_generations")
        if not self.generation_temperature >= 0:
            raise ConfigError("generation_temperature must be >= 0 (0 = greedy), got "
                              f"{self.generation_temperature}")
        if not 0 < self.generation_top_p <= 1:
            raise ConfigError(f"generation_top_p must lie in (0, 1], got {self.generation_top_p}")
        if self.generation_top_p < 1 and self.generation_temperature == 0:
            raise ConfigError("generation_top_p samples, but generation_temperature is 0 "
                              "(greedy): set a temperature > 0, or drop top-p")
        check_judge(self)  # reads trust_remote_code, of the model section
        if self.judge is not None and self.num_sample_generations == 0:
            raise ConfigError("judge scores the sample generations, but num_sample_generations "
                              "is 0: set it to the number of eval prompts to judge")
