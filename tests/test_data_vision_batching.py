"""The vision collator (issue 28): each pair's images once, in pair order, for padded,
padding-free and shared-prompt batches; image tokens checked against the processor; rankings
and unpaired rows with images refused."""
import functools

import pytest
import torch

from dpo.data import VisionCollator
from dpo.data.vision_tokenize import tokenize_pairs
from tests.vision_data import processor, row_with, vision_rows

pytestmark = pytest.mark.shared
LAYOUTS = {"padded": {}, "packed": {"padding_free": True}, "shared": {"share_prompt": True},
           "shared packed": {"share_prompt": True, "padding_free": True}}


@functools.cache
def pairs(family: str):
    """Two tokenized pairs, a 56-px and a 28-px image (Qwen: 4 tokens and 1)."""
    proc = processor(family)
    return list(tokenize_pairs(vision_rows(row_with(56), row_with(28)), proc.tokenizer,
                               max_length=64, processor=proc)[0])


def collate(family: str, rows, **layout):
    proc = processor(family)
    return VisionCollator(proc.tokenizer.pad_token_id, processor=proc, **layout)(rows)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen_pixels_and_grids_once_per_pair_in_every_layout(layout):
    proc = processor("qwen2_5_vl")
    batch = collate("qwen2_5_vl", pairs("qwen2_5_vl"), **LAYOUTS[layout])
    alone = proc.image_processor(images=[_image(row) for row in pairs("qwen2_5_vl")],
                                 return_tensors="pt")
    assert torch.equal(batch["pixel_values"], alone["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], alone["image_grid_thw"])
    assert batch["image_counts"].tolist() == [1, 1] and batch["image_counts"].dtype == torch.long
    # The token rows hold each pair's image tokens once per sequence holding its prompt: twice
    # (chosen and rejected), once when the two share the prompt.
    tokens = (batch["input_ids"] == proc.image_token_id).sum().item()
    per_pair = sum(row["image_tokens"][0] for row in pairs("qwen2_5_vl"))
    assert tokens == per_pair * (1 if "shared" in layout else 2)
    assert set(batch) - {"pixel_values", "image_grid_thw", "image_counts"} == \
        set(VisionCollator(0, processor=None, **LAYOUTS[layout])(
            [{k: v for k, v in row.items() if k not in ("images", "image_tokens")}
             for row in pairs("qwen2_5_vl")]))


def _image(row):
    import io

    from dpo.data.images import pil_image
    return pil_image().open(io.BytesIO(row["images"][0]["bytes"]))


def test_gemma_pixels_once_per_pair():
    batch = collate("gemma3", pairs("gemma3"))
    assert batch["pixel_values"].shape[0] == 2 and batch["pixel_values"].dim() == 4
    assert "image_grid_thw" not in batch and "num_crops" not in batch
    assert batch["image_counts"].tolist() == [1, 1]


def test_pairs_without_images_in_a_batch_count_zero():
    proc = processor("qwen2_5_vl")
    text = vision_rows({**row_with(), "prompt": [{"role": "user", "content": [
        {"type": "text", "text": "What colour?"}]}], "images": []})
    rows = list(tokenize_pairs(text, proc.tokenizer, max_length=64, processor=proc)[0])
    batch = collate("qwen2_5_vl", [*rows, pairs("qwen2_5_vl")[0]])
    assert batch["image_counts"].tolist() == [0, 1]
    assert batch["image_grid_thw"].shape == (1, 3)


def test_image_tokens_that_disagree_with_the_processor_are_one_line():
    stale = [{**row, "image_tokens": [row["image_tokens"][0] + 1]}
             for row in pairs("qwen2_5_vl")]
    made = [row["image_tokens"][0] for row in pairs("qwen2_5_vl")]
    with pytest.raises(ValueError, match=rf"^the processor expands these images to "
                       rf"\[{made[0]}, {made[1]}\] tokens, the tokenized pairs hold "
                       rf"\[{made[0] + 1}, {made[1] + 1}\]: they were tokenized with another "
                       r"image processor; tokenize them again with this one$"):
        collate("qwen2_5_vl", stale)


@pytest.mark.parametrize("extra", [{"label": True}, {"stages": 1}])
def test_unpaired_and_ranked_rows_with_images_are_refused(extra):
    rows = [{**row, **extra} for row in pairs("qwen2_5_vl")]
    with pytest.raises(ValueError, match=r"^pairs with images train as pairs: unpaired \(KTO\) "
                       r"and ranked rows with images are not supported$"):
        collate("qwen2_5_vl", rows)
