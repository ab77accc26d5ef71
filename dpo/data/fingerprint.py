"""The cache key of a tokenization: the code and settings that decide the tokenized rows."""
from __future__ import annotations

import importlib
from pathlib import Path

from datasets import Dataset
from datasets.fingerprint import Hasher

# The modules whose source decides the tokenized rows and the report. Both caches key on it
# (datasets' map cache, ``_fingerprint``; the on-disk ``dpo.data.cache``): any edit misses.
TOKENS_CODE = ("dpo.data.errors", "dpo.data.messages", "dpo.data.ranked", "dpo.data.transcripts",
               "dpo.data.formats", "dpo.data.render", "dpo.data.report", "dpo.data.tokenize",
               "dpo.data.images", "dpo.data.vision_tokenize")


def code_source() -> str:
    """The source of the ``TOKENS_CODE`` modules, in order, as one string (for cache keys)."""
    return "".join(Path(importlib.import_module(name).__file__).read_text()
                   for name in TOKENS_CODE)


def tokens_fingerprint(ds: Dataset, pair_tokenizer) -> str | None:
    """The cache key of a tokenization: what ``datasets`` would compute, but fast.

    By default ``Dataset.map`` pickles the function with its tokenizer to hash it, which takes
    seconds for a 150k-token vocabulary, on every call. The tokenizer's serialised form, the
    settings and the code (``TOKENS_CODE``) determine the result just as well. ``None`` (let
    datasets hash) for a slow tokenizer, which has no serialised form.
    """
    tokenizer = pair_tokenizer.tokenizer
    if not tokenizer.is_fast:
        return None
    renderer = pair_tokenizer.renderer
    return Hasher.hash([
        ds._fingerprint, tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template,
        tokenizer.eos_token, pair_tokenizer.end_id, pair_tokenizer.bos_id,
        pair_tokenizer.max_length, pair_tokenizer.max_prompt_length, renderer.mode,
        renderer.prompt_template, renderer.kwargs, renderer.tools, code_source(),
        getattr(pair_tokenizer, "processor_key", None),  # a vision tokenizer's processor
    ])
