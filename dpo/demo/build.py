"""Offline demo assets: a tokenizer, a tiny Qwen3 model and preference data, built locally.

`configs/demo.yaml` trains on ``model: builtin:tiny-qwen3-chat`` and
``dataset: builtin:demo-preferences``. Nothing comes from the Hugging Face Hub: on first use the
assets are generated from fixed seeds and cached under `demo_cache_dir()`, after which they load
like any hub checkpoint or dataset — `AutoTokenizer.from_pretrained(dir)`,
`AutoModelForCausalLM.from_pretrained(dir)`, `datasets.load_dataset(dir)`.

The preference rule (what DPO has to learn): **the chosen reply is polite and about the topic the
prompt asks about; the rejected reply says the same thing rudely, or politely but about another
topic.** Tone alone can be learned from the response tokens; the off-topic pairs are only told
apart by looking back at the prompt, so the demo shows DPO learning a *conditional* preference.

With ``lr=1e-3, beta=0.3``, 16 pairs per step and 10 warmup steps, DPO on the tiny model reaches
≥ 0.98 held-out reward accuracy within ~150 steps and ~1.0 by 250 (~30 s on two CPU cores): the
rude pairs are separated within a few dozen steps, the off-topic ones a hundred or so later.

The demo starts DPO from a model that already answers (``builtin:tiny-qwen3-chat``): a short
supervised phase (`supervise`, ~30 s on two CPU cores, once) teaches the tiny model answers of
every kind — polite or rude, on the prompt's topic or not — with rude ones the likelier, so its
greedy answers mostly break the rule. DPO then makes them polite and on topic: `answer_accepted`
(the judge ``builtin:demo-rule``) accepts ~0 of the reference's answers and ~0.9 of the policy's.

What is built:

- `build_demo_model` — a byte-level BPE tokenizer trained with the `tokenizers` library on the
  demo corpus (ChatML special tokens and chat template, as Qwen's), and a randomly initialised
  `Qwen3ForCausalLM` from `dpo.demo.tiny` whose vocabulary is exactly that tokenizer's.
- `build_demo_chat_model` — that model after the supervised phase, beside it in the cache.
- `build_demo_dataset` — `train.jsonl` and `test.jsonl` in the standard
  ``{"prompt", "chosen", "rejected"}`` format; no test pair occurs in the training split.

Both builders are safe to call from every process of a multi-process launch at once: each builds
into a private temporary directory and publishes it with one atomic `os.rename`, so a directory
under the cache is either absent or complete (it holds `COMPLETE_MARKER`), never half-written.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from dpo.paths import cache_root

BUILTIN_MODEL = "builtin:tiny-qwen3"  # randomly initialised: fast to build, for tests
BUILTIN_CHAT_MODEL = "builtin:tiny-qwen3-chat"  # the same after the supervised phase: the demo's
BUILTIN_DATASET = "builtin:demo-preferences"

# Bump when anything below changes what is built: the cache subfolder is named after it, so assets
# of an older format are never reused (they are simply left behind in their own folder).
DEMO_FORMAT_VERSION = 1
COMPLETE_MARKER = ".complete"  # dot-name: `datasets` ignores hidden files when finding splits
MODEL_DIR_NAME = "tiny-qwen3"
CHAT_MODEL_DIR_NAME = "tiny-qwen3-chat"
DATASET_DIR_NAME = "demo-preferences"

SEED = 0
# The supervised phase (`supervise`): ~40 s on two CPU cores, so that the model speaks.
SFT_STEPS = 600
SFT_BATCH_SIZE = 32
SFT_LEARNING_RATE = 3e-3
SFT_POLITE = 0.4  # share of polite answers it learns (the others rude)
SFT_ON_TOPIC = 0.7  # share of answers about the prompt's topic (the others about another)
NUM_TRAIN = 4000
NUM_TEST = 256
OFF_TOPIC_FRACTION = 0.5  # share of pairs whose rejected reply is polite but off-topic

# Merging until no pair is left would give ~1,076 tokens on the demo corpus, so at 1024 nearly
# every word is one token and a pair fits in ~50. The model is sized by `len(tokenizer)` (1024).
BPE_VOCAB_TARGET = 1024
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)
MODEL_CONFIG = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_position_embeddings=512)

# ChatML as in Qwen's template, without the <think> handling and tool calls. A turn is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# --- The demo world -------------------------------------------------------------------------
# Every topic comes with three short facts that name it, so an off-topic reply is recognisable
# from its words, and every reply is short enough for a 64-token pair.
TOPICS: dict[str, tuple[str, str, str]] = {
    "cats": ("Cats sleep for most of the day.", "Cats use their whiskers to judge gaps.",
             "Cats purr when they feel calm."),
    "dogs": ("Dogs can learn many spoken words.", "Dogs greet friends by wagging their tails.",
             "Dogs have a very keen sense of smell."),
    "bees": ("Bees turn nectar into honey.", "Bees dance to show where flowers are.",
             "Bees live in large busy hives."),
    "owls": ("Owls hunt quietly at night.", "Owls can turn their heads very far.",
             "Owls swallow small prey whole."),
    "whales": ("Whales breathe air through a blowhole.", "Whales sing long songs under water.",
               "Whales are the largest animals alive."),
    "rivers": ("Rivers carve valleys over time.", "Rivers carry water down to the sea.",
               "Rivers often start as small springs."),
    "volcanoes": ("Volcanoes release molten rock called lava.",
                  "Volcanoes can build new islands.", "Volcanoes often sleep for centuries."),
    "the moon": ("The moon pulls the tides of the sea.", "The moon shows us only one face.",
                 "The moon has no air to breathe."),
    "bread": ("Bread rises because yeast makes gas.", "Bread is baked from flour and water.",
              "Bread goes stale as it dries out."),
    "tea": ("Tea is made from dried leaves.", "Tea tastes bitter if it steeps too long.",
            "Tea was first drunk in China."),
    "chess": ("Chess is played on a board of sixty four squares.",
              "Chess pieces each move in their own way.", "Chess games can end in a draw."),
    "rain": ("Rain falls when clouds grow heavy.", "Rain fills lakes and wells.",
             "Rain smells fresh on dry ground."),
    "trains": ("Trains run on steel rails.", "Trains can carry heavy loads far.",
               "Trains were once pulled by steam engines."),
    "music": ("Music can change our mood.", "Music is written with notes on a staff.",
              "Music has rhythm, melody and harmony."),
    "gardens": ("Gardens need sun, soil and water.", "Gardens attract birds and insects.",
                "Gardens change with every season."),
    "snow": ("Snow is made of tiny ice crystals.", "Snow keeps the ground beneath it warm.",
             "Snow reflects most of the sunlight."),
    "stars": ("Stars are huge balls of hot gas.", "Stars seem to twinkle because of the air.",
              "Stars are born in clouds of dust."),
    "apples": ("Apples grow on trees in orchards.", "Apples float because they hold air.",
               "Apples come in many colours."),
    "bicycles": ("Bicycles turn pedal power into speed.", "Bicycles need no fuel at all.",
                 "Bicycles stay upright when they move."),
    "maps": ("Maps shrink the world onto paper.", "Maps use symbols for roads and rivers.",
             "Maps usually put north at the top."),
    "clocks": ("Clocks split the day into hours.", "Clocks once used swinging pendulums.",
               "Clocks keep trains and schools on time."),
    "forests": ("Forests make much of our oxygen.", "Forests are home to countless animals.",
                "Forests store water in their soil."),
    "penguins": ("Penguins cannot fly but swim fast.", "Penguins huddle together to stay warm.",
                 "Penguins live mostly in the south."),
    "deserts": ("Deserts get very little rain.", "Deserts can be cold at night.",
                "Deserts hide life under their sand."),
}

PROMPT_TEMPLATES = (
    "Tell me about {topic}.",
    "What can you say about {topic}?",
    "Could you explain {topic} to me?",
    "I want to learn about {topic}.",
    "Please describe {topic}.",
    "Share a fact about {topic}.",
)
POLITE_OPENERS = ("Happy to help!", "Of course!", "Great question!", "Gladly!",
                  "Thank you for asking.", "I would love to explain.")
POLITE_CLOSERS = ("I hope this helps.", "Thanks for your curiosity.",
                  "Please ask if you want more.", "Have a lovely day!", "Feel free to ask again.",
                  "It was a pleasure.")
RUDE_OPENERS = ("Ugh, fine.", "Whatever.", "What a silly question.", "Obviously.",
                "Look it up yourself.", "Sigh, again?")
RUDE_CLOSERS = ("Now leave me alone.", "Do not ask again.", "Figure out the rest.",
                "I am bored now.", "Stop bothering me.", "That is all you get.")


def demo_cache_dir() -> Path:
    """Where the demo assets live: ``$DPO_CACHE_DIR`` or ``~/.cache/dpo``, in a folder per format
    version (``demo-v1``), so a format change never reuses stale assets."""
    return cache_root() / f"demo-v{DEMO_FORMAT_VERSION}"


def build_demo_model(cache_dir: Path | None = None) -> Path:
    """The directory of the demo tokenizer and model (safetensors), built on first call.

    Loadable with `AutoTokenizer.from_pretrained(dir)` and
    `AutoModelForCausalLM.from_pretrained(dir)`. `cache_dir` defaults to `demo_cache_dir()`;
    the assets go to its ``tiny-qwen3`` subfolder.
    """
    target = Path(cache_dir or demo_cache_dir()) / MODEL_DIR_NAME
    return _build_atomically(target, _write_model)


def build_demo_chat_model(cache_dir: Path | None = None) -> Path:
    """The directory of the demo model after its supervised phase (`supervise`), built on first
    call from `build_demo_model`'s (in the same cache) into the ``tiny-qwen3-chat`` subfolder.
    It answers the demo's prompts in words, rudely for the most part: what DPO starts from."""
    root = Path(cache_dir or demo_cache_dir())
    base = build_demo_model(root)
    return _build_atomically(root / CHAT_MODEL_DIR_NAME,
                             lambda directory: _write_chat_model(directory, base))


def build_demo_dataset(cache_dir: Path | None = None) -> Path:
    """The directory of the demo preference data (``train.jsonl``, ``test.jsonl``), built on first
    call. `cache_dir` defaults to `demo_cache_dir()`; the data go to ``demo-preferences`` in it."""
    target = Path(cache_dir or demo_cache_dir()) / DATASET_DIR_NAME
    return _build_atomically(target, _write_dataset)


def resolve_model(name: str) -> str:
    """`--model` as a path or hub name: a built-in demo model is built (once) and its
    directory returned; any other name is returned unchanged."""
    if name == BUILTIN_CHAT_MODEL:
        return str(build_demo_chat_model())
    return str(build_demo_model()) if name == BUILTIN_MODEL else name


def resolve_dataset(name: str) -> str:
    """`--dataset` as a path or hub name, like `resolve_model` for the built-in demo data."""
    return str(build_demo_dataset()) if name == BUILTIN_DATASET else name


# --- Data ------------------------------------------------------------------------------------

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


def _write_dataset(directory: Path) -> None:
    train, test = demo_pairs()
    for split, rows in (("train", train), ("test", test)):
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- Tokenizer and model ---------------------------------------------------------------------

def build_tokenizer(texts: list[str]):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, with ChatML special tokens.

    Byte-level means every string maps to bytes first, and all 256 bytes are in the vocabulary:
    there is no unknown token and `decode(encode(text)) == text` exactly (no normaliser either).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets covering the leading space, as in Qwen.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,  # a chat model's turn ends with <|im_end|>: generation stops there
        pad_token=END_OF_TEXT,
        bos_token=None,  # Qwen adds no BOS; the chat template starts every turn
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,  # would rewrite " ." to "." and break round trips
    )


def _tokenizer_corpus() -> list[str]:
    # The role names are part of the corpus so that "user" and "assistant" become single tokens.
    train, _ = demo_pairs()
    return [f"user\n{r['prompt']}\nassistant\n{r['chosen']}\n{r['rejected']}" for r in train]


def _write_model(directory: Path) -> None:
    import torch

    from dpo.demo.tiny import tiny_qwen3

    tokenizer = build_tokenizer(_tokenizer_corpus())
    # fork_rng: tiny_qwen3 seeds the global generator; the caller's random stream stays untouched.
    with torch.random.fork_rng(devices=[]):
        model = tiny_qwen3(len(tokenizer), seed=SEED, **MODEL_CONFIG)
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = None
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)


def _write_chat_model(directory: Path, base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    # The supervised phase draws nothing from torch's generator (no dropout, its own data
    # stream); forked all the same, so that the caller's random stream stays untouched.
    with torch.random.fork_rng(devices=[]):
        supervise(model, tokenizer)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)


# --- The supervised phase: the tiny model learns to answer before DPO --------------------------

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


# --- Atomic, concurrent-safe publication -------------------------------------------------------

def _build_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Return `target`, first building it with `write(tmp_dir)` unless a complete copy exists.

    Several processes may race here (every rank of a launch calls the builder). Each writes into
    its own sibling temporary directory, adds `COMPLETE_MARKER` last, and `os.rename`s it to
    `target`. Renaming onto a non-empty directory fails, so the first finisher wins and the others
    discard their identical copy; readers never see a partial directory.
    """
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(
            json.dumps({"format_version": DEMO_FORMAT_VERSION, "seed": SEED}) + "\n")
        for _ in range(3):
            try:
                os.rename(tmp, target)  # atomic; replaces only an absent or empty target
                return target
            except OSError:
                if (target / COMPLETE_MARKER).exists():
                    return target  # another process won the race; its copy is identical
                # A directory without the marker was not made by this code (we publish only
                # complete ones): move it aside and retry. One unique name per attempt, so when
                # two processes try, only one rename succeeds and nothing is deleted twice.
                stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(target, stale)
                except OSError:
                    continue
                shutil.rmtree(stale, ignore_errors=True)
        raise RuntimeError(f"could not publish demo assets to {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
