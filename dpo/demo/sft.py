"""The supervised phase: the tiny model learns to answer before DPO.

`supervise` (~30 s on two CPU cores, once) teaches it answers of every kind — polite or rude, on
the prompt's topic or not — with rude ones the likelier, so its greedy answers mostly break the
rule and DPO has something to change.
"""
from __future__ import annotations

import random

from dpo.demo.facts import POLITE_CLOSERS, POLITE_OPENERS, RUDE_CLOSERS, RUDE_OPENERS, TOPICS
from dpo.demo.rule import SEED, _prompt_topic, demo_pairs

# ~40 s on two CPU cores, so that the model speaks.
SFT_STEPS = 600
SFT_BATCH_SIZE = 32
SFT_LEARNING_RATE = 3e-3
SFT_POLITE = 0.4  # share of polite answers it learns (the others rude)
SFT_ON_TOPIC = 0.7  # share of answers about the prompt's topic (the others about another)


def sft_answer(rng: random.Random, prompt: str) -> str:
    """An answer of any kind to `prompt`, as the supervised phase teaches them: polite or rude
    (`SFT_POLITE`), about the prompt's topic or another one (`SFT_ON_TOPIC`). The rule accepts
    about 0.4 × 0.7 of them, and no polite opener is as likely as a rude one, so greedy decoding
    answers rudely: DPO has something to change."""
    topic = _prompt_topic(prompt)
    if rng.random() >= SFT_ON_TOPIC:
        topic = rng.choice([t for t in TOPICS if t != topic])
    facts = " ".join(rng.sample(TOPICS[topic], 2))
    polite = rng.random() < SFT_POLITE
    opener = rng.choice(POLITE_OPENERS if polite else RUDE_OPENERS)
    closer = rng.choice(POLITE_CLOSERS if polite else RUDE_CLOSERS)
    return f"{opener} {facts} {closer}"


def supervise(model, tokenizer, steps: int | None = None) -> None:
    """Fine-tune `model` in place on `SFT_STEPS` batches of the training prompts with answers
    from `sft_answer` (loss on the answer and its end-of-turn token only), from fixed seeds.

    Deterministic on a given machine and thread count; it draws from its own generators, but
    the caller should still fork the global torch generator (dropout is zero: nothing draws)."""
    import torch

    steps = SFT_STEPS if steps is None else steps
    rng = random.Random(SEED + 1)
    prompts = [row["prompt"] for row in demo_pairs()[0]]
    rendered = {p: tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                 tokenize=False, add_generation_prompt=True)
                for p in set(prompts)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LEARNING_RATE, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (1 - step / steps))
    model.train()
    for _ in range(steps):
        rows = []
        for prompt in (rng.choice(prompts) for _ in range(SFT_BATCH_SIZE)):
            prompt_ids = tokenizer(rendered[prompt])["input_ids"]
            answer_ids = tokenizer(sft_answer(rng, prompt) + tokenizer.eos_token)["input_ids"]
            rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
        width = max(len(ids) for ids, _ in rows)
        pad = width - torch.tensor([len(ids) for ids, _ in rows])
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = (torch.arange(width)[None] < (width - pad)[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
