"""The online section: rounds in which the policy answers the prompts, a judge scores the
answers, and DPO trains on the best against the worst (`dpo.online`). Unset `rounds`: offline
training on the pairs of `--dataset`, and no field here may be given."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dpo.config.fields import ConfigError, _opt, check_at_least, declared_default
from dpo.config.judge import DEMO_RULE

REFERENCE_UPDATES = ("fixed", "per-round")


@dataclass
class OnlineSection:
    """online: rounds of online DPO — the policy answers, the judge scores, DPO trains on its
    best against its worst answers (dpo.online, docs/online.md)"""

    rounds: int | None = _opt(None, "online DPO: rounds of sample -> judge -> pair -> train on "
                              "the prompts of --dataset, scored by --judge; none = offline DPO "
                              "on --dataset's pairs")
    samples_per_prompt: int = _opt(4, "answers sampled per prompt each round (K >= 2); the "
                                   "best-scored and the worst make its pair")
    prompts_per_round: int | None = _opt(None, "prompts answered each round, taken in turn from "
                                         "the shuffled train prompts; none = all, every round")
    sample_temperature: float = _opt(1.0, "sampling temperature of the round's answers (> 0)")
    sample_top_p: float = _opt(1.0, "nucleus sampling's top-p of the round's answers")
    sample_max_new_tokens: int | None = _opt(None, "longest answer sampled in a round; none = "
                                             "max_new_tokens")
    reference_update: str = _opt("fixed", "the reference each round trains against: fixed = "
                                 "the start model (or --ref-model); per-round = the policy the "
                                 "round starts from", choices=REFERENCE_UPDATES)
    acceptance_threshold: float | None = _opt(None, "a judge score at or above which an answer "
                                              "counts as accepted (*/acceptance metrics); "
                                              f"none = 1 for {DEMO_RULE}, else no acceptance")

    def _validate_online(self) -> None:
        check_at_least(self, 1, "rounds", "prompts_per_round", "sample_max_new_tokens")
        if self.rounds is None:
            given = [f.name for f in dataclasses.fields(OnlineSection)
                     if getattr(self, f.name) != declared_default(OnlineSection, f.name)]
            if given:
                raise ConfigError(f"{given[0]} is a setting of online DPO: set --rounds, or "
                                  f"drop {given[0]}")
            return
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt {self.samples_per_prompt}: a pair needs two "
                              "answers to compare; sample 2 or more per prompt")
        if not self.sample_temperature > 0:
            raise ConfigError(f"sample_temperature must be > 0: at {self.sample_temperature} "
                              "(greedy) every answer to a prompt is the same")
        if not 0 < self.sample_top_p <= 1:
            raise ConfigError(f"sample_top_p must lie in (0, 1], got {self.sample_top_p}")
        if self.judge is None:
            raise ConfigError(f"rounds {self.rounds}: online DPO needs --judge to score the "
                              f"answers ({DEMO_RULE}, a reward model, or module:function)")
        for name in ("metric_for_best_model", "eval_dataset", "dataset_weights",
                     "dataset_num_samples"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name} is not a setting of online DPO, whose rounds train on "
                                  "their own answers and report held-out metrics per round "
                                  "(docs/online.md); drop it")
        if len(self.dataset) > 1:
            raise ConfigError("online rounds draw their prompts from one dataset; give one "
                              f"--dataset, not {len(self.dataset)}")
        if self.resume_from_checkpoint not in (None, "latest"):
            raise ConfigError(f"resume_from_checkpoint {self.resume_from_checkpoint}: an online "
                              "run resumes where it stopped, in whatever round and phase: use "
                              "latest")

    def accepts(self, score: float) -> bool | None:
        """Whether a judge's `score` counts as accepted; None without a threshold."""
        threshold = self.acceptance_threshold
        if threshold is None and self.judge == DEMO_RULE:
            threshold = 1.0
        return None if threshold is None else score >= threshold
