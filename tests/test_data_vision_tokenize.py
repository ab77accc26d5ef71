"""Vision pairs tokenized by the processor (issue 28): the prompt/response boundary exact for
both families, each image's token count, truncation that never cuts an image, and a cache key
that changes with the image processor."""
import copy
import dataclasses
import io

import pytest

from dpo.data.cache import cache_key, tokenize_cached
from dpo.data.images import pil_image
from dpo.data.messages import expand
from dpo.data.tokenize import IGNORE_INDEX
from dpo.data.vision_tokenize import tokenize_pairs
from tests.vision_data import FAMILIES, processor, row_with, vision_rows

pytestmark = pytest.mark.shared
END = {"qwen2_5_vl": "<|im_end|>", "gemma3": "<end_of_turn>"}


def whole(proc, row: dict, side: str) -> list[int]:
    """The processor's own ids for the whole rendered conversation, images expanded."""
    text = proc.apply_chat_template([expand(m) for m in row["prompt"] + row[side]],
                                    tokenize=False)
    pictures = [pil_image().open(io.BytesIO(r["bytes"])) for r in row["images"]]
    return list(proc(text=[text], images=pictures, add_special_tokens=False)["input_ids"][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_boundary_is_exact_and_the_prompt_expanded(family):
    proc = processor(family)
    rows = vision_rows(row_with(56), row_with(28))
    pairs, report = tokenize_pairs(rows, proc.tokenizer, max_length=128, processor=proc)
    assert report.kept == 2 and pairs.column_names[:2] == ["row_index", "images"]
    sizes = [(56, 56), (28, 28)]
    assert pairs["image_tokens"] == [[n] for n in proc._get_num_multimodal_tokens(
        image_sizes=sizes).num_image_tokens]
    assert pairs["images"] == rows["images"]  # the bytes travel on, for the collator
    for pair, row in zip(pairs, rows):
        prompt = pair["chosen_labels"].count(IGNORE_INDEX)
        for side in ("chosen", "rejected"):
            ids = pair[f"{side}_input_ids"]
            # The conversation tokenized at once starts with exactly the pair's ids (and goes on
            # with what the template writes after the turn's end).
            assert whole(proc, row, side)[:len(ids)] == ids
            assert proc.tokenizer.decode(ids[prompt:]) == \
                {"chosen": "Red.", "rejected": "Blue."}[side] + END[family]
        image_ids = [i for i in pair["chosen_input_ids"] if i in _image_ids(proc)]
        assert len(image_ids) == pair["image_tokens"][0]


def _image_ids(proc):
    return {i for i in getattr(proc, "image_token_ids", [proc.image_token_id]) if i is not None}


def test_truncation_never_cuts_into_an_image():
    proc = processor("qwen2_5_vl")
    long_answer = [{"role": "assistant", "content": [{"type": "text", "text": "Red. " * 40}]}]
    rows = vision_rows(row_with(56, chosen=long_answer))
    full, _ = tokenize_pairs(rows, proc.tokenizer, max_length=512, processor=proc)
    prompt = full[0]["chosen_labels"].count(IGNORE_INDEX)
    ids = full[0]["chosen_input_ids"]
    first = ids.index(proc.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    # Keeping fewer prompt tokens than follow the image's start cuts into it: dropped, counted.
    keep = prompt - first - 1
    with pytest.raises(ValueError, match=rf"^row 0: image_truncated: max_prompt_length {keep} "
                       rf"would cut the prompt's first {first + 1} tokens, inside image 0 "
                       rf"\(tokens {first}\.\.\d+\); raise max_prompt_length or make the images "
                       r"smaller \(strict mode\)$"):
        tokenize_pairs(rows, proc.tokenizer, max_length=keep + 20,
                       max_prompt_length=keep, processor=proc, strict=True)
    # Keeping the image's first token on keeps the image whole; the response is cut instead.
    pairs, report = tokenize_pairs(rows, proc.tokenizer, max_length=prompt - first + 20,
                                   max_prompt_length=prompt - first, processor=proc)
    assert report.truncated == 1 and pairs[0]["chosen_input_ids"][0] == ids[first]
    # A cut before the image (an earlier turn's text) keeps the row: the prompt keeps its end.
    later = vision_rows(row_with(56, prompt=[
        {"role": "user", "content": [{"type": "text", "text": "A long first question " * 8}]},
        {"role": "assistant", "content": [{"type": "text", "text": "An answer."}]},
        *row_with()["prompt"]]))
    pairs, report = tokenize_pairs(later, proc.tokenizer, max_length=40,
                                   max_prompt_length=30, processor=proc)
    assert report.kept == 1 and report.truncated == 1
    assert sum(i in _image_ids(proc) for i in pairs[0]["chosen_input_ids"]) == \
        pairs[0]["image_tokens"][0]


def test_the_report_counts_vision_drops():
    proc = processor("gemma3")
    rows = vision_rows(row_with(), row_with(images=[{"bytes": b"junk", "path": None}]),
                       row_with(images=[]))
    _, report = tokenize_pairs(rows, proc.tokenizer, max_length=64, processor=proc)
    assert report.dropped == {"image_unreadable": 1, "image_count_mismatch": 1}


def test_the_cache_key_covers_the_processor_and_the_image_bytes(tmp_path):
    proc = processor("qwen2_5_vl")
    rows = vision_rows(row_with())
    settings = dict(max_length=64, processor=proc)
    key = cache_key(rows, proc.tokenizer, settings)
    images = proc.image_processor
    proc.image_processor = copy.copy(images)  # the shared processor's own is left as it is
    try:
        # max_pixels 4 times as many: larger images make more tokens
        proc.image_processor.size = dataclasses.replace(
            images.size, longest_edge=images.size.longest_edge * 4)
        assert cache_key(rows, proc.tokenizer, settings) != key
    finally:
        proc.image_processor = images
    blue = vision_rows(row_with(images=[{"bytes": row_with(28)["images"][0]["bytes"],
                                         "path": None}]))
    assert cache_key(blue, proc.tokenizer, settings) != key
    assert cache_key(rows, proc.tokenizer, settings) == key
    lines = []
    # What it returns is the saved entry, read back: the images' bytes survive the cache.
    pairs, _ = tokenize_cached(rows, proc.tokenizer, cache_dir=tmp_path, log=lines.append,
                               **settings)
    assert "saved to cache" in lines[0] and pairs["images"] == rows["images"]


def test_the_loaders_tokenize_images_with_the_processor_and_eval_rows_keep_them(tmp_path):
    from dpo.config import TrainConfig
    from dpo.demo.shapes import write_shapes_dataset
    from dpo.train.loaders import build_datasets, make_collator
    from tests.test_data_sources import _Accelerator

    proc = processor("qwen2_5_vl")
    folder = write_shapes_dataset(tmp_path / "shapes", n_train=4, n_test=2, seed=0)
    cfg = TrainConfig(model="tiny-vl", dataset=str(folder), max_length=64, num_samples=None,
                      eval_samples=2, tokenize_cache=False, padding_free=True,
                      share_prompt=False)
    train, evals = build_datasets(cfg, _Accelerator(), proc.tokenizer, processor=proc)
    assert (len(train), len(evals)) == (4, 2) and train["image_tokens"] == [[1]] * 4
    # Eval rows keep their images (for sample generations) beside their prompt messages.
    assert [len(images) for images in evals["images"]] == [1, 1]
    assert "prompt_messages" in evals.column_names
    batch = make_collator(cfg, proc.tokenizer, processor=proc)(list(evals))
    assert batch["image_counts"].tolist() == [1, 1] and "packed_sequences" in batch
