"""Offline demo assets: a tokenizer, a tiny Qwen3 model and preference data, built locally.

`configs/demo.yaml` trains on ``model: builtin:tiny-qwen3-chat`` and
``dataset: builtin:demo-preferences``. Nothing comes from the Hugging Face Hub: on first use the
assets are generated from fixed seeds and cached under `demo_cache_dir()`, after which they load
like any hub checkpoint or dataset — `AutoTokenizer.from_pretrained(dir)`,
`AutoModelForCausalLM.from_pretrained(dir)`, `datasets.load_dataset(dir)`.

The pairs follow the preference rule of `dpo.demo.rule` (polite and on the prompt's topic).

With ``lr=1e-3, beta=0.3``, 16 pairs per step and 10 warmup steps, DPO on the tiny model reaches
≥ 0.98 held-out reward accuracy within ~150 steps and ~1.0 by 250 (~30 s on two CPU cores): the
rude pairs are separated within a few dozen steps, the off-topic ones a hundred or so later.

The demo starts DPO from a model that already answers (``builtin:tiny-qwen3-chat``): a short
supervised phase (`dpo.demo.sft.supervise`, ~30 s on two CPU cores, once) teaches the tiny model
answers of every kind — polite or rude, on the prompt's topic or not — with rude ones the likelier, so its
greedy answers mostly break the rule. DPO then makes them polite and on topic: `answer_accepted`
(the judge ``builtin:demo-rule``) accepts ~0 of the reference's answers and ~0.9 of the policy's.

What is built:

- `build_demo_model` — a byte-level BPE tokenizer trained with the `tokenizers` library on the
  demo corpus (ChatML special tokens and chat template, as Qwen's), and a randomly initialised
  `Qwen3ForCausalLM` from `dpo.demo.tiny` whose vocabulary is exactly that tokenizer's.
- `build_demo_chat_model` — that model after the supervised phase, beside it in the cache.
- `build_demo_dataset` — `train.jsonl` and `test.jsonl` in the standard
  ``{"prompt", "chosen", "rejected"}`` format; no test pair occurs in the training split.
- `build_demo_prompts` — ``builtin:demo-prompts``: the demo's 144 prompts alone (``{"prompt"}``,
  the ``prompts`` format), 120 to train on and 24 held out, for online DPO to answer.

Every builder is safe to call from every process of a multi-process launch at once: each builds
into a private temporary directory and publishes it with one atomic `os.rename`, so a directory
under the cache is either absent or complete (it holds `COMPLETE_MARKER`), never half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from dpo.demo.rule import SEED, demo_pairs, demo_prompts
from dpo.demo.sft import supervise
from dpo.paths import cache_root

BUILTIN_MODEL = "builtin:tiny-qwen3"  # randomly initialised: fast to build, for tests
BUILTIN_CHAT_MODEL = "builtin:tiny-qwen3-chat"  # the same after the supervised phase: the demo's
BUILTIN_DATASET = "builtin:demo-preferences"
BUILTIN_PROMPTS = "builtin:demo-prompts"

# Bump when anything below changes what is built: the cache subfolder is named after it, so assets
# of an older format are never reused (they are simply left behind in their own folder).
DEMO_FORMAT_VERSION = 1
COMPLETE_MARKER = ".complete"  # dot-name: `datasets` ignores hidden files when finding splits
MODEL_DIR_NAME = "tiny-qwen3"
CHAT_MODEL_DIR_NAME = "tiny-qwen3-chat"
DATASET_DIR_NAME = "demo-preferences"
PROMPTS_DIR_NAME = "demo-prompts"

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
    return _build_atomically(target, lambda directory: _write_splits(directory, demo_pairs()))


def build_demo_prompts(cache_dir: Path | None = None) -> Path:
    """The directory of the demo prompts (``train.jsonl``, ``test.jsonl`` of ``{"prompt"}``
    rows, `demo_prompts`), built on first call into ``demo-prompts`` under `cache_dir`."""
    target = Path(cache_dir or demo_cache_dir()) / PROMPTS_DIR_NAME
    return _build_atomically(target, lambda directory: _write_splits(directory, demo_prompts()))


def resolve_model(name: str) -> str:
    """`--model` as a path or hub name: a built-in demo model is built (once) and its
    directory returned; any other name is returned unchanged."""
    if name == BUILTIN_CHAT_MODEL:
        return str(build_demo_chat_model())
    return str(build_demo_model()) if name == BUILTIN_MODEL else name


def resolve_dataset(name: str) -> str:
    """`--dataset` as a path or hub name, like `resolve_model` for the built-in demo data."""
    if name == BUILTIN_PROMPTS:
        return str(build_demo_prompts())
    return str(build_demo_dataset()) if name == BUILTIN_DATASET else name


def _write_splits(directory: Path, splits: tuple[list[dict], list[dict]]) -> None:
    for split, rows in zip(("train", "test"), splits):
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
