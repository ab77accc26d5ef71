"""Tokenizing vision preference rows with the model's processor, the boundary exact.

A pair is rendered as text rows are (``PairRenderer``), with the processor's chat template (the
one that writes image parts as placeholders). The responses' ids are taken as for text, from the
text-only tokenization at their boundary with the unexpanded prompt: a response holds no image
(``image_in_response``), and the generation prompt's special tokens separate the last image
from it, so expanding the prompt cannot move that boundary. The prompt's ids come from one
processor call on the prompt text and the row's images, which expands each placeholder to the
image's tokens (Qwen2.5-VL: one ``<|image_pad|>`` per merged patch; Gemma 3: ``<start_of_image>``
+ soft tokens + ``<end_of_image>``) and runs the image processor once per row. The expanded
prompt is never patched into the unexpanded ids: BPE merges cross the expansion (Gemma's
``"\\n\\n\\n"``).

Pixel values are not stored (a 448² image is 4.7 MiB of Qwen pixel values): the rows keep their
images' bytes (``images``) and how many tokens each expands to (``image_tokens``), and the
collator (``dpo.data.vision_batching``) makes the pixels batch by batch. Truncation keeps the
prompt's end: a cut that would fall inside (or before the end of) an image's tokens drops the
row as ``image_truncated``, since its pixels would no longer match its tokens.
"""
from __future__ import annotations

import functools
import io

from dpo.data import tokenize as tokenize_module
from dpo.data.errors import RowProblem
from dpo.data.images import pil_image
from dpo.data.tokenize import UNUSABLE_PAIR, _PairTokenizer


def tokenize_pairs(ds, tokenizer, *, processor=None, **settings):
    """``tokenize_preferences(ds, tokenizer, **settings)``; with a ``processor`` (a vision
    model's), rendered with its chat template and the prompts' images expanded by it
    (``VisionPairTokenizer``): the rows keep ``images`` and gain ``image_tokens``."""
    if processor is None:
        return tokenize_module.tokenize_preferences(ds, tokenizer, **settings)
    return tokenize_module.tokenize_preferences(
        ds, ProcessorTemplate(processor), **settings,
        pair_class=functools.partial(VisionPairTokenizer, processor))


class ProcessorTemplate:
    """A processor's tokenizer with the processor's chat template in place of its own: what
    ``PairRenderer`` and ``_PairTokenizer`` take, everything else the tokenizer's."""

    def __init__(self, processor):
        self.tokenizer = processor.tokenizer
        self.chat_template = processor.chat_template

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        if name in ("tokenizer", "chat_template") or name.startswith("__"):
            raise AttributeError(name)  # unpickling (Dataset.map workers) asks before they are set
        return getattr(self.tokenizer, name)


def image_token_ids(processor) -> set[int]:
    """The ids an image expands to (Gemma 3's soft token: its ``image_token_id`` is the
    ``<start_of_image>`` placeholder the text holds before expansion)."""
    ids = getattr(processor, "image_token_ids", None) or [processor.image_token_id]
    return {i for i in ids if i is not None}


class VisionPairTokenizer(_PairTokenizer):
    """``_PairTokenizer`` for rows with images: the pair's columns plus ``image_tokens`` (the
    tokens each image expands to); the rows keep their ``images``."""

    UNUSABLE = {**UNUSABLE_PAIR, "image_tokens": []}

    def __init__(self, processor, template: ProcessorTemplate, **settings):
        if processor.chat_template is None:
            raise ValueError(f"the processor ({type(processor).__name__}) has no chat template: "
                             "images need one that writes image parts")
        if settings.get("mode") != "auto":
            raise ValueError(f"rows with images need the processor's chat template (chat_template"
                             f" auto), not chat_template {settings.get('mode')}")
        super().__init__(template, **settings)
        self.processor = processor
        self.image_ids = image_token_ids(processor)
        # The specials that open and close an image's tokens (<|vision_start|>, <end_of_image>).
        self.special_ids = set(processor.tokenizer.all_special_ids) - self.image_ids
        self.processor_key = processor_settings(processor)

    def pair_columns(self, row, prompt_text, prompt, chosen, rejected, more=None) -> dict:
        image = pil_image()
        pictures = [image.open(io.BytesIO(record["bytes"])) for record in row.get("images", [])]
        try:
            expanded = self.processor(text=[prompt_text], images=pictures or None,
                                      add_special_tokens=False)["input_ids"][0]
        except ValueError as e:  # the template wrote another number of placeholders
            raise RowProblem("image_count_mismatch", " ".join(str(e).split())) from None
        prompt = self.with_bos(list(expanded))
        blocks = self.image_blocks(prompt)
        if len(blocks) != len(pictures):
            raise RowProblem("image_count_mismatch", f"{len(pictures)} images, {len(blocks)} "
                             "runs of image tokens in the rendered prompt")
        self.check_truncation(prompt, max(len(chosen), len(rejected)), blocks)
        out = self.truncate_and_label(prompt, chosen, rejected, more=more)
        out["image_tokens"] = [sum(i in self.image_ids for i in prompt[a:b]) for a, b in blocks]
        return out

    def image_blocks(self, ids: list[int]) -> list[tuple[int, int]]:
        """(start, end) of each image's tokens: a run of image tokens, widened by the special
        token right before and right after it."""
        blocks, i = [], 0
        while i < len(ids):
            if ids[i] not in self.image_ids:
                i += 1
                continue
            start = i
            while i < len(ids) and ids[i] in self.image_ids:
                i += 1
            start -= start > 0 and ids[start - 1] in self.special_ids
            blocks.append((start, i + (i < len(ids) and ids[i] in self.special_ids)))
        return blocks

    def check_truncation(self, prompt: list[int], longest: int, blocks) -> None:
        """``RowProblem`` (``image_truncated``) when ``truncate_and_label`` would cut the prompt
        at or after the start of its first image."""
        if not blocks or len(prompt) + longest <= self.max_length \
                or len(prompt) <= self.max_prompt_length:
            return
        keep_bos = self.bos_id is not None and prompt[:1] == [self.bos_id]
        cut = len(prompt) - self.max_prompt_length + keep_bos  # the first position kept
        if cut > blocks[0][0]:
            raise RowProblem("image_truncated", f"max_prompt_length {self.max_prompt_length} "
                             f"would cut the prompt's first {cut} tokens, inside image 0 "
                             f"(tokens {blocks[0][0]}..{blocks[0][1] - 1}); raise "
                             "max_prompt_length or make the images smaller")


def processor_settings(processor) -> str:
    """What of a processor decides the tokens beyond its tokenizer, as text for cache keys: its
    class, its own settings (Gemma 3's ``image_seq_length``), the image processor's (sizes,
    ``min_pixels``/``max_pixels``) and the chat template."""
    return "\n".join([type(processor).__qualname__, processor.to_json_string(),
                      processor.image_processor.to_json_string(), str(processor.chat_template)])
