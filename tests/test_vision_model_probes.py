"""The start-up probes on vision-language models (`dpo.model.probes`, `dpo.model.padding_probe`):
random tokens avoid image ids, the layout probes include an image pair, Qwen2.5-VL passes them
and Gemma 3 (image tokens attend both ways) is refused in one line."""
import re

import pytest
import torch
from accelerate import Accelerator

from dpo.config import ConfigError, TrainConfig
from dpo.model.packed_attention import DENSE_MASK_ONLY
from dpo.model.padding_probe import check_padding_free, check_shared_prompt, random_ids
from dpo.model.probes import check_chunked_head, settle_logps_path
from dpo.model.vision import special_ids
from tests.vision_models import load_tiny_vision

pytestmark = pytest.mark.shared  # the ../shared tokenizers

# max_length as a run's (TrainConfig's default 512), below the tiny Gemma's 4096-token sliding
# window: without it the probe adds a pair past the window, whose full logits (262k vocabulary)
# would take tens of GB
LAYOUTS = {"packed": lambda model, chunked: check_padding_free(model, chunked=chunked,
                                                              max_length=512),
           "shared": lambda model, chunked: check_shared_prompt(
               model, chunked=chunked, padding_free=False, max_length=512),
           "shared-packed": lambda model, chunked: check_shared_prompt(
               model, chunked=chunked, padding_free=True, max_length=512)}


@pytest.fixture(scope="module", params=["qwen2_5_vl", "gemma3"])
def family(request):
    processor, model = load_tiny_vision(request.param)
    model.config._attn_implementation = "sdpa"
    return request.param, model


def test_random_probe_tokens_avoid_image_ids_and_are_unchanged_for_text_models(family):
    name, model = family
    avoid = special_ids(model.config)
    assert model.config.image_token_id in avoid and len(avoid) >= 3  # with the delimiters
    vocab = model.get_output_embeddings().out_features
    ids = random_ids(model, vocab, 20_000, torch.Generator().manual_seed(0))
    assert not set(ids) & set(avoid) and max(ids) > vocab * 0.99

    from dpo.demo.tiny import tiny_qwen3

    assert random_ids(tiny_qwen3(64), 64, 30, torch.Generator().manual_seed(1)) == \
        torch.randint(64, (30,), generator=torch.Generator().manual_seed(1)).tolist()


def test_the_chunked_head_probe_passes(family):
    name, model = family
    assert check_chunked_head(model) is None


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_qwen_passes_the_layout_probes_and_gemma_is_refused(family, layout):
    name, model = family
    reason = LAYOUTS[layout](model, layout != "shared")  # the full logits' path once
    if name == "qwen2_5_vl":
        assert reason is None
        return
    assert reason.startswith("gemma3's image tokens attend to each other both ways, which "
                             + ("shared prompts" if "shared" in layout else "packed rows")
                             + " cannot keep (their attention is causal only;")
    assert "\n" not in reason
    # ... and the probe's image pair shows it: its log-probs differ beyond the tolerance
    diff, tolerance = map(float, re.search(r"by up to (\S+) nats \(tolerance (\S+):",
                                           reason).groups())
    assert diff > 10 * tolerance


def test_asking_gemma_for_packed_rows_or_shared_prompts_is_one_line(family, capsys):
    name, model = family
    accelerator = Accelerator(cpu=True)
    if name == "qwen2_5_vl":
        settled = settle_logps_path(accelerator, TrainConfig(share_prompt=True), model)
        assert settled.padding_free is True and settled.share_prompt is True
        return
    with pytest.raises(ConfigError, match="image tokens attend to each other both ways") as error:
        settle_logps_path(accelerator, TrainConfig(padding_free=True), model)
    assert str(error.value).startswith("padding_free: Gemma3ForConditionalGeneration")
    assert "\n" not in str(error.value)  # (--share-prompt: the same check_shared_prompt reason)
    settled = settle_logps_path(accelerator, TrainConfig(), model)  # left unset: off, said why
    assert settled.padding_free is False and settled.share_prompt is False
    assert "padding-free batches: off (Gemma3ForConditionalGeneration does not keep packed " \
           "sequences apart: gemma3's image tokens" in capsys.readouterr().out
    assert type(model) not in DENSE_MASK_ONLY  # not mistaken for a model that wants sdpa's mask
