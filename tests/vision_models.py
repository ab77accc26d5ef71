"""Tiny vision-language checkpoints for tests: each family's model and processor saved once per
test session into a temporary directory (removed at exit), from the ../shared tokenizers."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from tests.conftest import GEMMA3_TOKENIZER, QWEN3_TOKENIZER, require_shared

TOKENIZERS = {"qwen2_5_vl": QWEN3_TOKENIZER, "gemma3": GEMMA3_TOKENIZER}


def tiny_vision_model_dir(family: str) -> Path:
    """The saved tiny `family` ("qwen2_5_vl" or "gemma3") checkpoint; skips (with the reason)
    when ../shared lacks the family's tokenizer."""
    return _built(family, str(require_shared(TOKENIZERS[family])))[0]


@functools.cache
def _built(family: str, tokenizer_dir: str):
    """(directory, processor): the processor as built, before saving, which encodes as the
    saved one loads (tests/test_vision_model_processors.py), without reading the tokenizer
    again."""
    import torch

    from dpo.demo.tiny_vision import FAMILIES, save_tiny_vision

    root = Path(tempfile.mkdtemp(prefix=f"dpo-tiny-{family}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        processor = FAMILIES[family][0](tokenizer_dir)
        return save_tiny_vision(family, root / family, tokenizer_dir, processor=processor), \
            processor
    finally:
        torch.set_num_threads(threads)


def load_tiny_vision(family: str):
    """`(processor, model)`: the tiny checkpoint's processor (shared: do not change it) and a
    fresh copy of its saved model in eval mode."""
    from transformers import AutoModelForImageTextToText

    processor = _built(family, str(require_shared(TOKENIZERS[family])))[1]
    model = AutoModelForImageTextToText.from_pretrained(tiny_vision_model_dir(family))
    model.config.use_cache = model.config.get_text_config().use_cache = False
    return processor, model.eval()


def noise(size: tuple[int, int], seed: int):
    """A PIL image of random pixels: a one-colour image gives identical image tokens, whose
    attention pattern (causal or both ways) then changes nothing, and a test of it could not
    fail."""
    import torch
    from PIL import Image

    pixels = torch.randint(256, (size[1], size[0], 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.numpy())


# (image size, seed, question, chosen, rejected): sizes differ, so Qwen's grids do
PAIRS = [((56, 84), 0, "What colour is it?", "Red.", "It is blue, I think."),
         ((84, 56), 1, "Colour?", "Blue, clearly.", "Green."),
         ((56, 56), 2, "And this one?", "Green.", "Red, or maybe orange.")]


def encode_pairs(processor, pairs=PAIRS) -> list[dict]:
    """Each pair's prompt (the processor's encoding of the rendered chat, one image) and its
    responses' token ids (answer and end of turn, as the template would close them)."""
    tokenizer = processor.tokenizer
    end = "<|im_end|>\n" if "<|im_end|>" in tokenizer.get_vocab() else "<end_of_turn>\n"
    encoded = []
    for size, seed, question, chosen, rejected in pairs:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        # The rendered text holds the BOS already (Gemma): no second one.
        prompt = processor(text=[text], images=[noise(size, seed)], return_tensors="pt",
                           add_special_tokens=False)
        encoded.append({"prompt": prompt, **{
            key: tokenizer(answer + end, add_special_tokens=False)["input_ids"]
            for key, answer in (("chosen", chosen), ("rejected", rejected))}})
    return encoded


def collate(pairs: list[dict], **collator_kwargs) -> dict:
    """A `PreferenceCollator` batch of `pairs` plus their images, once per pair (the keys the
    data side's collator adds)."""
    import torch

    from dpo.data.batching import PreferenceCollator
    from dpo.model.logprobs import IGNORE_INDEX

    rows = []
    for pair in pairs:
        prompt = pair["prompt"]["input_ids"][0].tolist()
        rows.append({f"{key}_{part}": prompt + pair[key] if part == "input_ids"
                     else [IGNORE_INDEX] * len(prompt) + pair[key]
                     for key in ("chosen", "rejected") for part in ("input_ids", "labels")})
    batch = PreferenceCollator(0, **collator_kwargs)(rows)
    batch["pixel_values"] = torch.cat([p["prompt"]["pixel_values"] for p in pairs])
    if "image_grid_thw" in pairs[0]["prompt"]:
        batch["image_grid_thw"] = torch.cat([p["prompt"]["image_grid_thw"] for p in pairs])
    batch["image_counts"] = torch.ones(len(pairs), dtype=torch.long)
    return batch


def alone(model, pairs: list[dict]):
    """(2B,) summed response log-probs, each sequence alone through the model's own forward
    (its own image processing, positions and masks), `[chosen; rejected]`."""
    import torch

    from dpo.model.logprobs import IGNORE_INDEX, sequence_logps

    sums = []
    for key in ("chosen", "rejected"):
        for pair in pairs:
            inputs = dict(pair["prompt"])
            response = torch.tensor([pair[key]])
            ids = torch.cat([inputs["input_ids"], response], dim=1)
            for name in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
                if name in inputs:
                    inputs[name] = torch.cat([inputs[name], torch.full_like(response, int(
                        name == "attention_mask"))], dim=1)
            labels = ids.clone()
            labels[:, :pair["prompt"]["input_ids"].shape[1]] = IGNORE_INDEX
            logits = model(**{**inputs, "input_ids": ids}).logits
            sums.append(sequence_logps(logits, labels)[0])
    return torch.cat(sums)
