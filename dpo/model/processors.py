"""The processor of a vision-language model: its tokenizer, image processor and chat template.

`load_processor(path)` is `AutoProcessor.from_pretrained` with one-line errors, and with one
fallback: Qwen2-VL and Qwen2.5-VL processors hold a video processor that needs torchvision,
which cannot always be installed (a CPU torch with PyPI's torchvision fails to import). Without
it the image-only processor is built from the saved parts, and one warning line says videos need
torchvision. A text-only model (no `vision_config`) has no processor: None.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from transformers import AutoConfig, AutoProcessor, PreTrainedTokenizerBase

from dpo.config import ConfigError
from dpo.config.model import adapter_base, is_adapter_dir

logger = logging.getLogger(__name__)
VISION_EXTRA = 'pip install "dpo[vision]"'
# Families whose processor needs torchvision only for videos.
VIDEO_NEEDS_TORCHVISION = ("qwen2_vl", "qwen2_5_vl")


def is_vision_config(config) -> bool:
    """Whether a model config is a vision-language model's (it has a vision tower's config)."""
    return getattr(config, "vision_config", None) is not None


def load_processor(path: str, *, trust_remote_code: bool = False):
    """The model's processor, or None for a text-only model; ConfigError (one line) when it
    cannot be loaded, or when what loads is a bare tokenizer (no image processor)."""
    if is_adapter_dir(path) and not (Path(path) / "processor_config.json").is_file():
        path = adapter_base(path)  # an adapter saved without its processor
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {path}: cannot load its config: {_first_line(e)}") from None
    if not is_vision_config(config):
        return None
    try:
        importlib.import_module("PIL")  # the image processors' backend here
    except ImportError:
        raise ConfigError(f"model {path} is a vision-language model: its images need pillow "
                          f'({VISION_EXTRA})') from None
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ImportError as e:
        if config.model_type not in VIDEO_NEEDS_TORCHVISION or "orchvision" not in str(e):
            raise ConfigError(f"model {path}: cannot load its processor: "
                              f"{_first_line(e)}") from None
        processor = image_only_processor(path)
        logger.warning("model %s: torchvision is not installed: its processor takes images "
                       "only (videos need torchvision)", path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ConfigError(f"model {path}: cannot load its processor: {_first_line(e)}") from None
    if isinstance(processor, PreTrainedTokenizerBase) or \
            getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"model {path} is a vision-language model ({config.model_type}) but "
                          f"its processor loads as a bare {type(processor).__name__}: the "
                          "directory needs a processor_config.json naming a known "
                          "processor_class")
    return processor


def image_only_processor(path: str):
    """A Qwen2.5-VL processor without its video processor, from the saved tokenizer, image
    processor (PIL backend) and chat template."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    from dpo.demo.tiny_vision import ImageOnlyQwen2_5_VLProcessor

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        images = Qwen2VLImageProcessorPil.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {path}: cannot load its processor's parts: "
                          f"{_first_line(e)}") from None
    return ImageOnlyQwen2_5_VLProcessor(images, tokenizer, chat_template=tokenizer.chat_template)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
