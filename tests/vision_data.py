"""Vision rows and processors for the data tests (issue 28): the tiny processors of
``dpo.demo.tiny_vision`` (built once per session from ../shared tokenizers) and one row in
TRL's conversational vision layout."""
from __future__ import annotations

import functools
import io

from dpo.data.formats import normalise
from dpo.data.images import pil_image
from tests.conftest import GEMMA3_TOKENIZER, QWEN3_TOKENIZER, require_shared

FAMILIES = ("qwen2_5_vl", "gemma3")


@functools.cache
def _processor(family: str):
    from dpo.demo import tiny_vision

    if family == "qwen2_5_vl":
        return tiny_vision.qwen2_5_vl_processor(str(QWEN3_TOKENIZER))
    return tiny_vision.gemma3_processor(str(GEMMA3_TOKENIZER))


def processor(family: str):
    """The family's tiny processor (shared: tests must not change it); skips without
    ../shared."""
    require_shared(QWEN3_TOKENIZER if family == "qwen2_5_vl" else GEMMA3_TOKENIZER)
    return _processor(family)


def square(size: int = 56, colour=(220, 30, 30)):
    return pil_image().new("RGB", (size, size), colour)


def png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


ROW = {"prompt": [{"role": "user", "content": [{"type": "image"},
                                               {"type": "text", "text": "What colour?"}]}],
       "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
       "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}


def vision_rows(*rows: dict):
    """Rows (each with ``images`` as PNG bytes) normalised as a loaded dataset's are."""
    from datasets import Dataset

    return normalise(Dataset.from_list([dict(row) for row in rows]))


def row_with(size: int = 56, **change) -> dict:
    return {**ROW, "images": [{"bytes": png(square(size)), "path": None}], **change}
