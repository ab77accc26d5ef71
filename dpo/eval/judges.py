"""Judges of sample answers: did the policy's own answers get better than the reference's?

A judge scores `(prompt messages, answer)` pairs; higher is better. `--judge builtin:demo-rule`
is the offline demo's rule (1 when the answer is polite and on the prompt's topic, else 0);
`--judge PATH` a reward model, any `AutoModelForSequenceClassification` with one output, which
reads the conversation through its own tokenizer and chat template (not the policy's);
`--judge package.module:function` or `--judge path/to/file.py:function` the user's function
`(prompts, answers) -> scores`. Scores are read through `checked_scores`, which names the answer
a judge failed on.

`win_rate` counts a tie as half a win, so a policy that answers exactly as its reference does
scores 0.5 under any deterministic judge.
"""
from __future__ import annotations

import math
import numbers

import torch

# What a judge may be is checked with the config, before anything loads; loading reuses it.
from dpo.config import ConfigError
from dpo.config.judge import (DEMO_RULE, check_judge, check_labels, first_line, is_function,
                              judge_function, render, reward_tokenizer)


class DemoRuleJudge:
    """The demo's rule as a judge: 1.0 for a polite answer on the prompt's topic, else 0.0."""

    name = DEMO_RULE

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        from dpo.demo import answer_accepted

        return [float(answer_accepted(_last_user_turn(p), a)) for p, a in zip(prompts, answers)]


class FunctionJudge:
    """The user's function `(prompt messages, answers) -> one score per answer, higher better`,
    named by its import path (`package.module:function` or `path/to/file.py:function`)."""

    def __init__(self, path: str):
        self.name, self.function = path, judge_function(path)

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        return self.function(prompts, answers)


class RewardModelJudge:
    """A reward model's scalar score of the conversation `prompt + [answer]`, in batches."""

    def __init__(self, path: str, device: torch.device, batch_size: int,
                 trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification

        self.name, self.device, self.batch_size = path, device, batch_size
        self.tokenizer = reward_tokenizer(path, trust_remote_code)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(f"judge {path}: cannot load it as a reward model "
                              f"(AutoModelForSequenceClassification): {first_line(e)}") from None
        check_labels(path, self.model.config)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)

    def render(self, prompt: list[dict], answer: str) -> str:
        return render(self.name, self.tokenizer, prompt, answer)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        texts = [self.render(p, a) for p, a in zip(prompts, answers)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            # The template wrote any special tokens already: none are added again.
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True,
                                   add_special_tokens=False, return_tensors="pt").to(self.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


def load_judge(cfg, device: torch.device):
    """The judge `--judge` names, or None; ConfigError (one line) if it cannot be loaded."""
    if cfg.judge is None:
        return None
    check_judge(cfg)
    if cfg.judge == DEMO_RULE:
        return DemoRuleJudge()
    if is_function(cfg.judge):
        return FunctionJudge(cfg.judge)
    return RewardModelJudge(cfg.judge, device, cfg.generation_batch_size, cfg.trust_remote_code)


class JudgeError(ConfigError):
    """A judge that raised on an answer or gave it no valid score (one line, as a ConfigError)."""


def checked_scores(judge, prompts: list[list[dict]], answers: list[str], *, what: str,
                   first: int = 0) -> list[float]:
    """`judge.score(prompts, answers)` as floats, checked to be one finite real number per
    answer; a bool counts as 0 or 1 (a rule's verdict). Otherwise JudgeError, one line: the
    judge, `what` it scored ("the policy's sample answers at step 4"), and the answer at fault,
    its index counted from `first` (where these answers start in the whole list); where the
    call raised, the answers are scored one at a time to find the one it raises on. A judge's
    ConfigError (a template that cannot render) passes through as it is."""
    if not answers:  # a process's share may be empty: the judge need not handle that
        return []
    try:
        scores = judge.score(prompts, answers)
    except ConfigError:
        raise
    except Exception as e:  # the user's function may raise anything
        for i in range(len(answers)):
            try:
                judge.score(prompts[i:i + 1], answers[i:i + 1])
            except ConfigError:
                raise
            except Exception as alone:
                raise JudgeError(f"{_answer(judge, what, first + i, answers[i])} raised "
                                 f"{type(alone).__name__}: {first_line(alone)}") from alone
        raise JudgeError(f"judge {judge.name} on {what}: raised {type(e).__name__}: "
                         f"{first_line(e)} on all {len(answers)} answers at once, on none "
                         "alone") from e
    if not isinstance(scores, (list, tuple)):
        raise JudgeError(f"judge {judge.name} on {what}: gave a {type(scores).__name__}, not a "
                         f"list of {len(answers)} scores")
    if len(scores) != len(answers):
        raise JudgeError(f"judge {judge.name} on {what}: gave {len(scores)} scores for "
                         f"{len(answers)} answers")
    for i, score in enumerate(scores):
        if not (isinstance(score, numbers.Real) and math.isfinite(score)):
            raise JudgeError(f"{_answer(judge, what, first + i, answers[i])} got the score "
                             f"{_short(repr(score))}, not a finite number")
    return [float(score) for score in scores]


def _answer(judge, what: str, index: int, answer: str) -> str:
    return f"judge {judge.name} on {what}, answer {index} ({_short(repr(answer))})"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def win_rate(policy: list[float], reference: list[float]) -> float:
    """Share of prompts where the policy's answer scores higher; a tie counts half."""
    if len(policy) != len(reference) or not policy:
        raise ValueError(f"win_rate needs as many scores on each side, at least one: got "
                         f"{len(policy)} and {len(reference)}")
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference))
    return wins / len(policy)


def _last_user_turn(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
