"""Judges of sample answers: did the policy's own answers get better than the reference's?

A judge scores `(prompt messages, answer)` pairs; higher is better. `--judge builtin:demo-rule`
is the offline demo's rule (1 when the answer is polite and on the prompt's topic, else 0);
`--judge PATH` a reward model, any `AutoModelForSequenceClassification` with one output, which
reads the conversation through its own tokenizer and chat template (not the policy's).

`win_rate` counts a tie as half a win, so a policy that answers exactly as its reference does
scores 0.5 under any deterministic judge.
"""
from __future__ import annotations

import torch

# What a judge may be is checked with the config, before anything loads; loading reuses it.
from dpo.config import ConfigError
from dpo.config.judge import (DEMO_RULE, check_judge, check_labels, first_line, render,
                              reward_tokenizer)


class DemoRuleJudge:
    """The demo's rule as a judge: 1.0 for a polite answer on the prompt's topic, else 0.0."""

    name = DEMO_RULE

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        from dpo.demo import answer_accepted

        return [float(answer_accepted(_last_user_turn(p), a)) for p, a in zip(prompts, answers)]


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
    return RewardModelJudge(cfg.judge, device, cfg.generation_batch_size, cfg.trust_remote_code)


def win_rate(policy: list[float], reference: list[float]) -> float:
    """Share of prompts where the policy's answer scores higher; a tie counts half."""
    if len(policy) != len(reference) or not policy:
        raise ValueError(f"win_rate needs as many scores on each side, at least one: got "
                         f"{len(policy)} and {len(reference)}")
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference))
    return wins / len(policy)


def _last_user_turn(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
