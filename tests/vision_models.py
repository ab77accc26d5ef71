"""Tiny vision-language checkpoints for tests: each family's model and processor saved once per
test session into a temporary directory (removed at exit), from the ../shared tokenizers."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from tests.conftest import GEMMA3_TOKENIZER, QWEN3_TOKENIZER, require_shared

TOKENIZERS = {"qwen2_5_vl": QWEN3_TOKENIZER, "gemma3": GEMMA3_TOKENIZER}


def tiny_vision_model_dir(family: str) -> Path:
    """The saved tiny `family` ("qwen2_5_vl" or "gemma3") checkpoint; skips (with the reason)
    when ../shared lacks the family's tokenizer."""
    return _saved(family, str(require_shared(TOKENIZERS[family])))


@functools.cache
def _saved(family: str, tokenizer_dir: str) -> Path:
    import torch

    from dpo.demo.tiny_vision import save_tiny_vision

    root = Path(tempfile.mkdtemp(prefix=f"dpo-tiny-{family}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return save_tiny_vision(family, root / family, tokenizer_dir)
    finally:
        torch.set_num_threads(threads)
