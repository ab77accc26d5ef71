"""Loading a vision-language model and its processor (`dpo.model.processors`, `dpo.model.loading`)
from the saved tiny checkpoints of both families (tests/vision_models.py)."""
import json
import logging
import shutil

import pytest
import torch

from dpo.config import ConfigError, TrainConfig
from dpo.demo.tiny_vision import ImageOnlyQwen2_5_VLProcessor
from dpo.model.loading import load_policy_and_reference
from dpo.model.processors import load_processor
from tests.vision_models import PAIRS, encode_pairs, load_tiny_vision, tiny_vision_model_dir

FAMILIES = ["qwen2_5_vl", "gemma3"]

pytestmark = pytest.mark.shared  # the ../shared tokenizers


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_tiny_checkpoint_loads_as_a_vision_model_with_its_processor(family, caplog):
    path = str(tiny_vision_model_dir(family))
    with caplog.at_level(logging.WARNING, logger="dpo.model.processors"):
        processor = load_processor(path)
    assert type(processor.image_processor).__name__.endswith("Pil")  # no torchvision here
    # it encodes a pair as the processor the checkpoint was saved from
    loaded, built = (encode_pairs(p, PAIRS[:1])[0] for p in (processor,
                                                             load_tiny_vision(family)[0]))
    assert loaded.keys() == built.keys() and loaded["prompt"].keys() == built["prompt"].keys()
    for key, value in built["prompt"].items():
        assert torch.equal(loaded["prompt"][key], value), key
    assert loaded["chosen"] == built["chosen"]
    policy, _ = load_policy_and_reference(
        TrainConfig(model=path, output_dir="unused", loss_type="simpo"), path)  # no reference
    # Gemma's processor's image_token_id is <start_of_image>; the soft token is the tokenizer's
    image_token = getattr(processor.tokenizer, "image_token_id", processor.image_token_id)
    assert policy.config.image_token_id == image_token
    assert type(policy).__name__.endswith("ForConditionalGeneration")
    assert not policy.config.get_text_config().use_cache
    if family == "qwen2_5_vl":
        # The real Qwen2_5_VLProcessor needs torchvision for its video processor: the image-only
        # one is built from the saved parts, with the saved chat template, and says so once.
        assert json.loads((tiny_vision_model_dir(family) / "processor_config.json").read_text())[
            "processor_class"] == "Qwen2_5_VLProcessor"
        assert type(processor) is ImageOnlyQwen2_5_VLProcessor
        assert "<|vision_start|><|image_pad|><|vision_end|>" in processor.chat_template
        assert [r.getMessage().count("\n") for r in caplog.records] == [0]
        assert "videos need torchvision" in caplog.records[0].getMessage()
    else:
        assert type(processor).__name__ == "Gemma3Processor" and not caplog.records


def test_a_text_only_model_has_no_processor(tmp_path):
    from dpo.demo.tiny import tiny_qwen3_config

    tiny_qwen3_config(64).save_pretrained(tmp_path)
    assert load_processor(str(tmp_path)) is None


def test_a_vision_model_without_a_processor_is_one_line(tmp_path, tiny_tokenizer):
    shutil.copy(tiny_vision_model_dir("gemma3") / "config.json", tmp_path)
    with pytest.raises(ConfigError, match="cannot load its processor") as error:
        load_processor(str(tmp_path))  # nothing but the model's config
    assert "\n" not in str(error.value)
    tiny_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["processor_class"] = "NoSuchProcessor"  # AutoProcessor: the bare tokenizer
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="gemma3.* loads as a bare ") \
            as error:
        load_processor(str(tmp_path))
    assert "\n" not in str(error.value)


def test_a_vision_model_without_pillow_is_one_line(tmp_path, monkeypatch):
    import sys

    shutil.copy(tiny_vision_model_dir("gemma3") / "config.json", tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError
    with pytest.raises(ConfigError, match=r'its images need pillow \(pip install "dpo\[vision\]"'):
        load_processor(str(tmp_path))
