"""Judges given by import path (`--judge tests/judge_functions.py:<name>`) in the online tests."""


def length_score(prompts, answers):
    """Longer is better: a judge whose scores are not 0 or 1."""
    return [float(len(answer)) for answer in answers]


def same_score(prompts, answers):
    """Every answer alike: no pair can be made."""
    return [0.5 for _ in answers]


def fails_on_cats(prompts, answers):
    """Fails on a sample about cats (as a reward model may fail on one input)."""
    for prompt in prompts:
        if "cats" in prompt[-1]["content"]:
            raise ValueError("cannot score an answer about cats")
    return [0.0 for _ in answers]
