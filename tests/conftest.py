"""Shared fixtures: paths into ../shared (real data, the Qwen3 tokenizer) and a tiny model."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
QWEN3_TOKENIZER = SHARED / "tokenizers" / "qwen3"
QWEN3_VOCAB = 151_669  # len(tokenizer) of the real Qwen3 tokenizer


def require_shared(path: Path) -> Path:
    """Skip (with the reason) when a file from ../shared is missing: a user's clone has none."""
    if not path.exists():
        pytest.skip(f"{path} not found: ../shared ships with CI, not with a user's clone")
    return path


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(require_shared(QWEN3_TOKENIZER)))
