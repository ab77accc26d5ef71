"""What a vision-language model's `generate` reads beside a batch of prompt ids: the prompts'
images as pixel values, and which tokens are image tokens.

The prompts come from tokenized rows, whose ids the processor already expanded (each image's
placeholder token repeated once per token of that image) and whose `images` column holds each
prompt's images undecoded (`{"bytes", "path"}`, in prompt order). So only the images are left to
process here: decoded, and made into pixel values by the processor's image processor, the batch's
images in prompt order, which is the order of their placeholder runs in the left-padded ids.
"""
from __future__ import annotations

import hashlib
import io

import torch

from dpo.data.images import pil_image

# The keys of the image processor's output that `generate` reads (Gemma 3's `num_crops` it does
# not), and the names under which a family takes its image-token marks: the Qwen2-VL family
# (`mm_token_type_ids`, for its 3-D rotary positions), Gemma 3 (`token_type_ids`, for its
# image tokens' two-way attention). A processor lists the one its model reads among its
# `model_input_names`.
IMAGE_KEYS = ("pixel_values", "image_grid_thw")
MARK_KEYS = ("mm_token_type_ids", "token_type_ids")


def image_inputs(model, processor, images: list[list[dict]], ids: torch.Tensor) -> dict:
    """`generate`'s image inputs for the prompts `ids` (left-padded, `(rows, width)`) whose
    images are `images` (one list per row, `{"bytes", "path"}` each); {} when none has one.

    `pixel_values` (Qwen2.5-VL `(patches, 1176)`, Gemma 3 `(images, 3, H, W)`, in the model's
    dtype), Qwen's `image_grid_thw`, and the marks: 1 where a row's token is the model's image
    token (`config.image_token_id`), 0 elsewhere (padding included).
    """
    pictures = [decoded(record) for row in images for record in row]
    if not pictures:
        return {}
    made = processor.image_processor(images=pictures, return_tensors="pt")
    inputs = {key: made[key].to(ids.device) for key in IMAGE_KEYS if key in made}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    marks = (ids == model.config.image_token_id).long()
    inputs.update({key: marks for key in MARK_KEYS if key in processor.model_input_names})
    return inputs


def forget_rope_deltas(model) -> None:
    """Drop the rotary offsets a Qwen2-VL-family model keeps from its last `generate` call
    (`model.model.rope_deltas`, one per row of that call's batch): a later forward without input
    ids, or with a KV cache, would add them to its own positions. Nothing for other models."""
    inner = getattr(model, "model", None)
    if getattr(inner, "rope_deltas", None) is not None:
        inner.rope_deltas = None


def collapsed(ids: list[int], token: int) -> list[int]:
    """`ids` with each run of `token` cut to one: a prompt as logs show it, each image one
    placeholder however many tokens the processor expanded it to (a real model's: hundreds)."""
    return [t for i, t in enumerate(ids) if t != token or i == 0 or ids[i - 1] != token]


def decoded(record: dict):
    """A PIL image from `{"bytes", "path"}`: its bytes, else the file at its path."""
    source = io.BytesIO(record["bytes"]) if record.get("bytes") else record["path"]
    return pil_image().open(source)


def image_label(record: dict) -> str:
    """How a logged sample names an image: its path, else `sha256:` and the first 12 hex digits
    of its bytes' hash (enough to tell a data set's images apart and find one)."""
    if record.get("path"):
        return record["path"]
    return "sha256:" + hashlib.sha256(record["bytes"]).hexdigest()[:12]
