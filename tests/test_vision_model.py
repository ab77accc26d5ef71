"""Vision-language models in the concatenated forward (`dpo.model.vision`): tiny Qwen2.5-VL and
Gemma 3 (tests/vision_models.py), each pair's image encoded once; the [chosen; rejected] batch's
log-probs and gradients equal each sequence's alone, and Qwen's packed and shared-prompt rows
equal its padded ones."""
import pytest
import torch

from dpo.config import ConfigError
from dpo.model.forward import concatenated_forward
from dpo.model.packed_attention import use_packed_sdpa
from dpo.model.vision import FAMILIES, image_inputs, vision_family, vision_modules
from tests.vision_models import alone, collate, encode_pairs, load_tiny_vision

pytestmark = pytest.mark.shared  # the ../shared tokenizers


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(name, processor, model in eval mode, pairs: prompt encodings and response ids)."""
    processor, model = load_tiny_vision(request.param)
    return request.param, processor, model, encode_pairs(processor)


def together(model, batch, **kwargs) -> torch.Tensor:
    out = concatenated_forward(model, batch, **kwargs)
    return torch.cat([out.chosen_logps, out.rejected_logps])


def tower_of(model) -> torch.nn.Module:
    return dict(vision_modules(model))["model." + vision_family(model).frozen[0]]


def test_processors_make_the_models_image_tokens(family):
    name, processor, model, pairs = family
    ids = pairs[0]["prompt"]["input_ids"][0]
    image = ids == model.config.image_token_id
    # Qwen: one placeholder per 2×2 merged patches (56×84 px capped at 16 patches of 14 px:
    # a 4×2 grid, 2 tokens); Gemma: image_seq_length
    grid = pairs[0]["prompt"].get("image_grid_thw")
    assert int(image.sum()) == (int(grid.prod()) // 4 if name == "qwen2_5_vl" else 4)
    if name == "gemma3":  # rendered with add_special_tokens=False: the template's BOS only
        assert int((ids == processor.tokenizer.bos_token_id).sum()) == 1


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "full"])
def test_pairs_give_each_sequences_own_logps(family, chunked):
    name, processor, model, pairs = family
    with torch.no_grad():
        want = alone(model, pairs)
        got = together(model, collate(pairs), chunked=chunked, chunk_size=8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the images matter: other pixels, other log-probs
    batch = collate(pairs)
    batch["pixel_values"] = batch["pixel_values"].flip(0)
    with torch.no_grad():
        assert not torch.allclose(together(model, batch, chunk_size=8), want, atol=1e-4)


def test_the_tower_runs_once_per_pair_and_gets_both_uses_gradients(family):
    """One call of the vision tower on the pairs' B images, and the gradient of the sum of all
    log-probs equals that of the sequences apart (each image's features used twice)."""
    name, processor, model, pairs = family
    calls = []
    handle = tower_of(model).register_forward_hook(
        lambda m, args, kwargs, out: calls.append(len((args or [kwargs["pixel_values"]])[0])),
        with_kwargs=True)
    try:
        model.zero_grad()
        together(model, collate(pairs), chunk_size=8).sum().backward()
    finally:
        handle.remove()
    assert calls == [len(collate(pairs)["pixel_values"])]
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone(model, pairs).sum().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any(".visual." in n or ".vision_tower." in n
                                             for n in got)
    for n in want:  # to fp32 rounding of each tensor's scale (Gemma's projector's is ~4e3)
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-5 * float(
            want[n].abs().max().clamp(min=1)), msg=lambda m: n + m)
    model.zero_grad()


def test_a_frozen_tower_runs_without_autograd(family):
    name, processor, model, pairs = family
    outputs = []
    handle = tower_of(model).register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        for module in dict(vision_modules(model)).values():
            module.requires_grad_(False)
        together(model, collate(pairs), chunk_size=8).sum().backward()
    finally:
        handle.remove()
        model.requires_grad_(True)
    hidden = outputs[0] if torch.is_tensor(outputs[0]) else outputs[0][0]
    assert not hidden.requires_grad
    assert all(p.grad is None for _, m in vision_modules(model) for p in m.parameters())
    assert model.lm_head.weight.grad is not None
    model.zero_grad()


@pytest.mark.parametrize("layout", [dict(padding_free=True), dict(share_prompt=True),
                                    dict(share_prompt=True, padding_free=True)],
                         ids=["packed", "shared", "shared-packed"])
def test_qwen_packed_and_shared_rows_give_the_padded_logps(family, layout):
    """Qwen's equal its padded rows; Gemma 3's do not (its image tokens attend both ways, which
    causal packed and shared rows cannot keep): why the probes refuse them for it
    (tests/test_vision_model_probes.py)."""
    name, processor, model, pairs = family
    use_packed_sdpa(model)
    with torch.no_grad():
        want = together(model, collate(pairs), chunk_size=8)
        got = together(model, collate(pairs, **layout), chunk_size=8)
    if name == "qwen2_5_vl":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert (got - want).abs().max() > 1e-3


def test_images_for_a_text_only_model_and_an_unknown_family_are_one_line():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from dpo.demo.tiny import tiny_qwen3

    with pytest.raises(ConfigError, match="text-only model: it cannot take images"):
        image_inputs(tiny_qwen3(64), {"input_ids": torch.zeros(2, 3, dtype=torch.long),
                                      "pixel_values": torch.zeros(1)}, 2)
    config = Qwen2VLConfig(text_config=dict(num_hidden_layers=1, hidden_size=32,
                                            num_attention_heads=2, num_key_value_heads=1,
                                            vocab_size=64),
                           vision_config=dict(depth=1, embed_dim=16, num_heads=2, hidden_size=32))
    with pytest.raises(ConfigError, match="qwen2_vl is a vision-language model family dpo does "
                       "not support yet"):
        vision_family(Qwen2VLForConditionalGeneration(config))


@pytest.mark.parametrize("processes, kind, stage, frozen, refused", [
    (2, "DEEPSPEED", 3, True, True), (2, "FSDP", 0, True, True), (2, "MULTI_CPU", 0, False, True),
    (2, "MULTI_CPU", 0, True, False), (2, "DEEPSPEED", 2, True, False), (1, "NO", 0, False, False)])
def test_pairs_without_an_image_are_refused_where_a_step_without_one_would_hang(
        processes, kind, stage, frozen, refused):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from datasets import Dataset

    from dpo.model.vision import check_vision_data

    accelerator = SimpleNamespace(num_processes=processes, distributed_type=DistributedType[kind],
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
                                      zero_stage=stage)))
    cfg = SimpleNamespace(freeze_vision_tower=frozen)
    image = {"bytes": b"x", "path": None}
    pairs = Dataset.from_dict({"images": [[image], [], [image, image], []]}).select([0, 1, 2])
    check_vision_data(accelerator, cfg, [pairs.select([0, 2])], [])  # all have images
    with pytest.raises(ConfigError, match="^a mixture of datasets with and without images"):
        check_vision_data(accelerator, cfg, [pairs, pairs.remove_columns("images")], [])
    if not refused:
        return check_vision_data(accelerator, cfg, [pairs], [])
    with pytest.raises(ConfigError, match=r"^pairs without an image: 1; .*every pair needs one"):
        check_vision_data(accelerator, cfg, [pairs.select([0, 2])], [pairs])  # eval rows too
