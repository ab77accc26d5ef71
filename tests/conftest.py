"""Shared fixtures: paths into ../shared (real data, real tokenizers) and a tiny model."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# DPO_SHARED points a checkout that does not sit beside ../shared (a git worktree) at it.
SHARED = Path(os.environ.get("DPO_SHARED") or ROOT.parent / "shared")
SHARED_DATA = SHARED / "data"
QWEN3_TOKENIZER = SHARED / "tokenizers" / "qwen3"
GEMMA3_TOKENIZER = SHARED / "tokenizers" / "gemma3"
LLAMA3_1_TOKENIZER = SHARED / "tokenizers" / "llama3_1"
QWEN3_VOCAB = 151_669  # len(tokenizer) of the real Qwen3 tokenizer


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """In-process tests run torch on one thread, as the runs they start do (`OMP_NUM_THREADS=1`):
    their tiny models gain nothing from a second one, and on 2 cores shared with those runs
    OpenMP's waiting threads made tests/test_forward_architectures.py 9x slower (230 s, not 25)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_shared(path: Path) -> Path:
    """Skip (with the reason) when a file from ../shared is missing: a user's clone has none."""
    if not path.exists():
        pytest.skip(f"{path} not found: ../shared ships with CI, not with a user's clone")
    return path


def load_shared_tokenizer(path: Path, **overrides):
    """A fresh tokenizer from ../shared; ``overrides`` (e.g. ``eos_token``) as from_pretrained
    takes them."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(require_shared(path)), **overrides)


# Session-wide tokenizers as shipped: tests must not change them (load their own to do so).
@pytest.fixture(scope="session")
def qwen3_tokenizer():
    return load_shared_tokenizer(QWEN3_TOKENIZER)


@pytest.fixture(scope="session")
def gemma3_tokenizer():
    return load_shared_tokenizer(GEMMA3_TOKENIZER)


@pytest.fixture(scope="session")
def llama3_1_tokenizer():
    return load_shared_tokenizer(LLAMA3_1_TOKENIZER)


# --- A tiny tokenizer built on the spot, so the data tests also run without ../shared ---------

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Question: how do I sort a list in Python? Answer: use sorted(items) or items.sort().",
    "<|user|>\nhello<|endoftext|>\n<|assistant|>\nhi there, how can I help you today?",
]
# A Llama-2-like template that writes the BOS itself, as many real templates do.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text round-trips
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS * 4, trainer)
    # Like Llama, the tokenizer adds BOS by itself (add_special_tokens=True).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", tokenizer.token_to_id("<s>"))],
    )
    return tokenizer.to_str()


@pytest.fixture(scope="session")
def tiny_tokenizer_json() -> str:
    return _tiny_tokenizer_json()


def _build_tiny_tokenizer(tokenizer_json: str, chat_template: str | None):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        bos_token="<s>",
        eos_token="<|endoftext|>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_json):
    """Byte-level BPE that adds BOS itself; no chat template and no pad token (a fresh one per
    test, since prepare_tokenizer sets the pad token)."""
    return _build_tiny_tokenizer(tiny_tokenizer_json, chat_template=None)


@pytest.fixture
def tiny_chat_tokenizer(tiny_tokenizer_json):
    """The tiny tokenizer with a chat template that writes BOS itself (the doubled-BOS trap)."""
    return _build_tiny_tokenizer(tiny_tokenizer_json, chat_template=TINY_CHAT_TEMPLATE)
