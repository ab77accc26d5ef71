"""The demo's preference rule and its pairs, generated from a seed.

The preference rule (what DPO has to learn): **the chosen reply is polite and about the topic the
prompt asks about; the rejected reply says the same thing rudely, or politely but about another
topic.** Tone alone can be learned from the response tokens; the off-topic pairs are only told
apart by looking back at the prompt, so the demo shows DPO learning a *conditional* preference.
`answer_accepted` (the judge ``builtin:demo-rule``) applies the rule to a generated answer.
"""
from __future__ import annotations

import random

from dpo.demo.facts import (POLITE_CLOSERS, POLITE_OPENERS, PROMPT_TEMPLATES, RUDE_CLOSERS,
                            RUDE_OPENERS, TOPICS)

SEED = 0
NUM_TRAIN = 4000
NUM_TEST = 256
NUM_TEST_PROMPTS = 24  # of the 144 prompts (6 templates x 24 topics) builtin:demo-prompts holds
OFF_TOPIC_FRACTION = 0.5  # share of pairs whose rejected reply is polite but off-topic


def demo_pairs(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """The train and test rows, ``{"prompt", "chosen", "rejected"}``, generated from `seed`.

    The test split is drawn from the same distribution but keeps only pairs that do not occur in
    the training split, so held-out accuracy measures the rule, not memorised rows.
    """
    rng = random.Random(seed)
    train = [_sample_pair(rng) for _ in range(NUM_TRAIN)]
    seen = {_key(row) for row in train}
    test = []
    while len(test) < NUM_TEST:
        row = _sample_pair(rng)
        if _key(row) not in seen:
            seen.add(_key(row))  # also keeps the test split free of duplicates
            test.append(row)
    return train, test


def demo_prompts(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """The train and test rows of ``builtin:demo-prompts``, ``{"prompt"}``: every prompt the
    demo asks (each template with each topic) once, shuffled with `seed`; the last
    `NUM_TEST_PROMPTS` are held out, so no test prompt is a training prompt."""
    prompts = [template.format(topic=topic) for template in PROMPT_TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(prompts)
    rows = [{"prompt": prompt} for prompt in prompts]
    return rows[:-NUM_TEST_PROMPTS], rows[-NUM_TEST_PROMPTS:]


def rule_holds(row: dict) -> bool:
    """Whether a row obeys the demo rule: the chosen reply is polite and on the prompt's topic,
    and the rejected one is rude (same facts) or polite about another topic."""
    topic = _prompt_topic(row["prompt"])
    chosen, rejected = row["chosen"], row["rejected"]
    if not (_is_polite(chosen) and _facts_topic(chosen) == topic):
        return False
    if _is_polite(rejected):
        return _facts_topic(rejected) not in (None, topic)
    return _is_rude(rejected) and _facts_topic(rejected) == topic


def answer_accepted(prompt: str, answer: str) -> bool:
    """Whether the demo rule accepts `answer` to the user's `prompt`: it is polite and about the
    topic the prompt asks about (what the chosen replies are). The judge `builtin:demo-rule`."""
    topic = _prompt_topic(prompt.strip())
    answer = answer.strip()
    return topic is not None and _is_polite(answer) and _facts_topic(answer) == topic


def _sample_pair(rng: random.Random) -> dict:
    topic = rng.choice(list(TOPICS))
    prompt = rng.choice(PROMPT_TEMPLATES).format(topic=topic)
    facts = " ".join(rng.sample(TOPICS[topic], 2))
    chosen = f"{rng.choice(POLITE_OPENERS)} {facts} {rng.choice(POLITE_CLOSERS)}"
    if rng.random() < OFF_TOPIC_FRACTION:
        other = rng.choice([t for t in TOPICS if t != topic])
        other_facts = " ".join(rng.sample(TOPICS[other], 2))
        rejected = f"{rng.choice(POLITE_OPENERS)} {other_facts} {rng.choice(POLITE_CLOSERS)}"
    else:
        rejected = f"{rng.choice(RUDE_OPENERS)} {facts} {rng.choice(RUDE_CLOSERS)}"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _key(row: dict) -> tuple[str, str, str]:
    return row["prompt"], row["chosen"], row["rejected"]


def _prompt_topic(prompt: str) -> str | None:
    for template in PROMPT_TEMPLATES:
        head, tail = template.split("{topic}")
        if prompt.startswith(head) and prompt.endswith(tail):
            return prompt[len(head):len(prompt) - len(tail)]
    return None


def _facts_topic(reply: str) -> str | None:
    found = {topic for topic, facts in TOPICS.items() if any(f in reply for f in facts)}
    return found.pop() if len(found) == 1 else None


def _is_polite(reply: str) -> bool:
    return reply.startswith(POLITE_OPENERS) and reply.endswith(POLITE_CLOSERS)


def _is_rude(reply: str) -> bool:
    return reply.startswith(RUDE_OPENERS) and reply.endswith(RUDE_CLOSERS)
