"""The collator for pairs with images: the text batch of ``PreferenceCollator``, and each pair's
images once.

The tokenized rows keep their images' bytes (``dpo.data.vision_tokenize``); here they are
decoded and made into pixel values by the processor's image processor, batch by batch
(DataLoader workers can take this work). Whatever the layout (padded, padding-free, shared
prompt), the pixels are the batch's pairs' images, each pair's once and in pair order, while the
token rows hold each pair's image tokens once per sequence that holds its prompt; the model runs
the vision tower once per pair and puts the features where the image tokens are
(``dpo.model``).
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import torch

from dpo.data.batching import PreferenceCollator
from dpo.data.images import pil_image

# What the image processor returns that the model reads; Gemma 3's ``num_crops`` it does not.
IMAGE_KEYS = ("pixel_values", "image_grid_thw")


class VisionCollator(PreferenceCollator):
    """``PreferenceCollator``'s batch plus, when the rows hold images: ``pixel_values`` (as the
    image processor makes them: Qwen2.5-VL ``(patches, 1176)``, Gemma 3 ``(images, 3, H, W)``),
    ``image_grid_thw`` ``(images, 3)`` for the Qwen family, and ``image_counts`` ``(B,)`` long,
    each pair's number of images. Rankings and unpaired rows with images are refused.

    Each pair's ``image_tokens`` (stored when tokenizing) must be what this processor expands
    its images to; ``ValueError`` otherwise (the rows were tokenized with another image
    processor)."""

    def __init__(self, pad_token_id: int, *, processor, **settings):
        super().__init__(pad_token_id, **settings)
        self.processor = processor

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if "images" not in rows[0]:
            return super().__call__(rows)
        if "label" in rows[0] or "stages" in rows[0]:
            raise ValueError("pairs with images train as pairs: unpaired (KTO) and ranked rows "
                             "with images are not supported")
        batch = super().__call__(rows)
        batch["image_counts"] = torch.tensor([len(row["images"]) for row in rows],
                                             dtype=torch.long)
        image = pil_image()
        pictures = [image.open(io.BytesIO(record["bytes"])) for row in rows
                    for record in row["images"]]
        if not pictures:
            return batch
        expected = [n for row in rows for n in row["image_tokens"]]
        sizes = [(picture.height, picture.width) for picture in pictures]
        made = list(self.processor._get_num_multimodal_tokens(image_sizes=sizes)
                    .num_image_tokens)
        if made != expected:
            raise ValueError(f"the processor expands these images to {made} tokens, the "
                             f"tokenized pairs hold {expected}: they were tokenized with another "
                             "image processor; tokenize them again with this one")
        pixels = self.processor.image_processor(images=pictures, return_tensors="pt")
        batch.update({key: pixels[key] for key in IMAGE_KEYS if key in pixels})
        return batch
