"""Tiny vision-language models and their processors, built from configs, for tests and demos.

Nothing is downloaded: the weights are random, the processors are made from a real tokenizer
directory (../shared/tokenizers/qwen3 or gemma3) and a default image processor shrunk to a few
patches. Without torchvision, transformers falls back to the image processors' PIL backend.
Families: "qwen2_5_vl" (3-D rotary positions) and "gemma3" (image tokens attend both ways).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration,
                          Gemma3Processor, PreTrainedModel, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# Qwen2.5-VL's chat template (as the released checkpoints ship it; also trl/chat_templates/
# qwen2_5_vl.jinja): the Qwen3 tokenizer's own template renders text content only.
QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH = 14  # both families' vision patch size in pixels
# The video processor's section of a saved Qwen2.5-VL processor (building it needs torchvision).
QWEN_VIDEO_PROCESSOR = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": PATCH,
                        "temporal_patch_size": 2, "merge_size": 2}


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without its video processor: that one needs torchvision, and the
    processor's class check fails on `None` when torchvision is missing (transformers 5.25:
    VIDEO_PROCESSOR_MAPPING is a dummy). Images only; a video raises AttributeError."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saved as the real processor saves itself, so that `AutoProcessor` (or this class,
        without torchvision) loads it back: the class name `Qwen2_5_VLProcessor` and the video
        processor's section."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        for name in ("processor_config.json", "tokenizer_config.json"):  # both name the class
            path = Path(save_directory) / name
            config = json.loads(path.read_text())
            config["processor_class"] = Qwen2_5_VLProcessor.__name__
            if name == "processor_config.json":
                config["video_processor"] = QWEN_VIDEO_PROCESSOR
            path.write_text(json.dumps(config, indent=2) + "\n")
        return files


def qwen2_5_vl_processor(tokenizer_dir: str, *, max_patches: int = 16) -> Qwen2_5_VLProcessor:
    """The Qwen3 tokenizer (its vocabulary has Qwen2.5-VL's vision tokens at the same ids:
    <|vision_start|> 151652, <|image_pad|> 151655) with the Qwen2-VL image processor, capped at
    `max_patches` patches of 14 px (`max_patches / 4` image tokens after the 2×2 merge)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    area = PATCH * PATCH
    images = Qwen2VLImageProcessorPil(min_pixels=4 * area, max_pixels=max_patches * area)
    return ImageOnlyQwen2_5_VLProcessor(images, tokenizer, chat_template=QWEN2_5_VL_TEMPLATE)


def tiny_qwen2_5_vl(vocab_size: int, *, seed: int = 0, hidden_size: int = 64
                    ) -> PreTrainedModel:
    """A random `Qwen2_5_VLForConditionalGeneration` in fp32: 2 text layers, 2 vision blocks.
    mrope_section must sum to head_dim / 2 (16 / 2 = 8)."""
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=hidden_size, patch_size=PATCH, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config)


def gemma3_processor(tokenizer_dir: str, *, image_size: int = 2 * PATCH,
                     tokens_per_image: int = 4) -> Gemma3Processor:
    """The Gemma 3 tokenizer (<start_of_image> 255999, <end_of_image> 256000,
    <image_soft_token> 262144, its own template renders image parts) with Gemma 3's image
    processor resizing to `image_size` px squared."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    images = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    return Gemma3Processor(images, tokenizer, chat_template=tokenizer.chat_template,
                           image_seq_length=tokens_per_image)


def tiny_gemma3(vocab_size: int, *, seed: int = 0, hidden_size: int = 64,
                image_size: int = 2 * PATCH, tokens_per_image: int = 4,
                **text_kwargs) -> PreTrainedModel:
    """A random `Gemma3ForConditionalGeneration` in fp32: 2 text layers, one of each of Gemma 3's
    kinds (a 16-token sliding window, which a chat prompt with an image outgrows, and full
    attention), and a 2-layer SigLIP without its pooling head (as Gemma 3 has it)."""
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=2048, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"])
    config = Gemma3Config(
        text_config={**text, **text_kwargs},
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=PATCH,
                           vision_use_head=False),
        mm_tokens_per_image=tokens_per_image,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    # transformers 5.25 initialises the projection to zeros: every image token would then be the
    # same vector, and no test of what images do could fail.
    nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)
    return model


# family -> (processor builder, model builder)
FAMILIES = {"qwen2_5_vl": (qwen2_5_vl_processor, tiny_qwen2_5_vl),
            "gemma3": (gemma3_processor, tiny_gemma3)}


def save_tiny_vision(family: str, directory: str | Path, tokenizer_dir: str | Path, *,
                     processor=None) -> Path:
    """Save a tiny `family` model and its processor into `directory`, loadable as a checkpoint.

    The Qwen processor saves itself under the real class name (`Qwen2_5_VLProcessor`), as
    released checkpoints have it, so loading it meets what loading a real one meets.
    `processor`: the family's processor already built from `tokenizer_dir` (saves a reload)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny vision family {family!r} (known: {', '.join(FAMILIES)})")
    make_processor, make_model = FAMILIES[family]
    processor = processor or make_processor(str(tokenizer_dir))
    directory = Path(directory)
    make_model(len(processor.tokenizer)).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
