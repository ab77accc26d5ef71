"""Vision rows (issue 28): the layouts TRL's vision DPO takes, normalised to image bytes and
content parts; bad images and counts dropped with a counted reason; the shapes test set; the
loader's one-line refusals."""
import json

import pytest
from datasets import Dataset, List
from datasets import Image as ImageFeature

from dpo.config import ConfigError, TrainConfig
from dpo.data import images, load_preference_splits
from dpo.data.formats import normalise, normalise_row, resolve_format
from dpo.data.messages import expand
from dpo.demo.shapes import COLOURS, shape_pairs, write_shapes_dataset
from tests.test_data_sources import _Accelerator
from tests.vision_data import ROW, png, row_with, square


def normalised(row: dict) -> dict:
    """One raw row normalised as ``normalise`` would (the format from its values' types)."""
    return normalise_row(row, resolve_format(Dataset.from_list([row]).features))


def parts_of(message: dict):
    return expand(message)["content"]


def test_trl_conversational_rows_keep_bytes_and_parts():
    data = png(square())
    row = normalised(row_with())
    assert row["problem"] == ""
    assert row["images"] == [{"bytes": data, "path": None}]  # the bytes as given, undecoded
    user = row["prompt"][0]
    assert user["content"] == "What colour?"  # the text, for judges, logs and checks
    assert parts_of(user) == [{"type": "image"}, {"type": "text", "text": "What colour?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Red.", "fields": ""}]


def test_string_prompts_get_their_image_parts_first(tmp_path):
    """Layout C (and D, one ``image``): parts go before the first user text, as TRL does."""
    path = tmp_path / "red.png"
    square().save(path)
    row = normalised({"prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.",
                      "images": [str(path), png(square(28))]})
    assert row["problem"] == ""
    assert [p["type"] for p in parts_of(row["prompt"][0])] == ["image", "image", "text"]
    assert row["images"][0] == {"bytes": path.read_bytes(), "path": str(path)}
    one = normalised({"prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.",
                      "image": {"bytes": png(square()), "path": None}})
    assert one["problem"] == "" and len(one["images"]) == 1


def test_inline_payloads_and_hub_image_columns():
    """Layout E: an image inside its part; and a Hub ``Image`` column read as bytes, never
    decoded (``Image(decode=False)``): the PNG bytes stored are the bytes normalised."""
    inline = {**ROW, "prompt": [{"role": "user", "content": [
        {"type": "image", "image": {"bytes": png(square(28)), "path": None}},
        {"type": "text", "text": "What colour?"}]}], "images": []}
    row = normalised(inline)
    assert row["problem"] == "" and row["images"][0]["bytes"] == png(square(28))
    hub = shape_pairs(3, seed=0)
    assert isinstance(hub.features["images"].feature, ImageFeature)
    stored = hub.cast_column("images", List(ImageFeature(decode=False)))["images"]
    rows = normalise(hub)
    assert rows.features["images"] == List(images.IMAGE)
    assert [r[0]["bytes"] for r in rows["images"]] == [r[0]["bytes"] for r in stored]
    assert set(rows["problem"]) == {""}


@pytest.mark.parametrize("change, problem", [
    ({"images": [{"bytes": png(square()), "path": None}] * 2},
     "image_count_mismatch: 2 images in images for 1 image parts in the prompt"),
    ({"images": []}, "image_count_mismatch: 0 images in images for 1 image parts in the prompt"),
    ({"images": [{"bytes": None, "path": "/no/such/image.png"}]},
     "image_unreadable: images[0] /no/such/image.png: No such file or directory"),
    ({"rejected": [{"role": "assistant", "content": [{"type": "image", "text": None}]}]},
     "image_in_response: rejected holds an image part; images belong in the prompt"),
])
def test_bad_rows_get_a_reason_and_one_line(change, problem):
    assert normalised(row_with(**change))["problem"] == problem


def test_junk_bytes_are_unreadable():
    row = normalised(row_with(images=[{"bytes": b"not an image", "path": None}]))
    assert row["problem"].startswith("image_unreadable: images[0]: cannot identify image file")
    assert row["images"] == []


def test_a_missing_image_file_is_one_counted_line_in_the_report(tmp_path):
    """As for every bad row: counted by reason in the filter report, the path in its detail."""
    from dpo.data.report import FilterReport

    rows = normalise(Dataset.from_list([row_with(), row_with(images=[
        {"bytes": None, "path": str(tmp_path / "gone.png")}])]))
    report = FilterReport.from_rows(rows["problem"], rows["row_index"], [False, False])
    assert report.dropped == {"image_unreadable": 1} and report.examples["image_unreadable"] == [1]
    assert str(report) == "kept 1 of 2 pairs (0 truncated), dropped 1: image_unreadable 1 " \
        f'(rows 1; "images[0] {tmp_path / "gone.png"}: No such file or directory")'


def test_text_only_parts_are_plain_text_and_rankings_with_images_are_refused():
    text = normalised({**ROW, "images": None})
    assert text["problem"] == "image_count_mismatch: 0 images in images for 1 image parts in " \
        "the prompt"
    plain = normalise_row({"prompt": [{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]}],
        "chosen": "A", "rejected": "B"}, resolve_format(Dataset.from_list([ROW]).features))
    assert plain["prompt"][0] == {"role": "user", "content": "Hi there", "fields": ""}
    ranked = Dataset.from_list([{"prompt": "Q", "responses": ["a", "b"], "ranks": [1, 2],
                                 "images": [png(square())]}])
    with pytest.raises(ValueError, match=r"^ranked rows with images are not supported"):
        normalise(ranked)


def test_shape_pairs_are_deterministic_and_right():
    a, b, other = shape_pairs(6, seed=1), shape_pairs(6, seed=1), shape_pairs(6, seed=2)
    raw = List(ImageFeature(decode=False))
    data = [r[0]["bytes"] for r in a.cast_column("images", raw)["images"]]
    assert data == [r[0]["bytes"] for r in b.cast_column("images", raw)["images"]]
    assert data != [r[0]["bytes"] for r in other.cast_column("images", raw)["images"]]
    for row in a:
        picture = row["images"][0]
        assert picture.size == (28, 28)
        answer = row["chosen"][0]["content"][0]["text"]
        assert answer != row["rejected"][0]["content"][0]["text"]
        # The chosen colour is the shape's: the most saturated pixel is that colour.
        drawn = max(picture.getdata(), key=lambda p: max(p) - min(p))
        assert drawn == COLOURS[answer.rstrip(".").lower()]


def test_streamed_image_columns_are_read_as_bytes():
    """A stream (``--streaming``) is cast before its rows are drawn: the bytes, not PIL."""
    stream = images.undecoded(shape_pairs(2, seed=0).to_iterable_dataset())
    stored = shape_pairs(2, seed=0).cast_column("images", List(ImageFeature(decode=False)))
    assert [row["images"] for row in stream] == stored["images"]


def test_a_written_shapes_dataset_loads_with_its_test_split(tmp_path):
    folder = write_shapes_dataset(tmp_path / "shapes", n_train=6, n_test=3, seed=0)
    train, evals = load_preference_splits(str(folder), num_samples=None, eval_samples=3,
                                          seed=0)
    assert (len(train), len(evals)) == (6, 3)
    assert set(train["problem"]) == set(evals["problem"]) == {""}
    assert train["images"][0][0]["bytes"].startswith(b"\x89PNG")
    assert json.loads(train[0]["prompt"][0]["fields"])["content_parts"][0] == {"type": "image"}


def test_loaders_refuse_images_for_a_text_only_model(tmp_path, tiny_tokenizer):
    from dpo.data import prepare_tokenizer
    from dpo.train.loaders import build_datasets

    folder = write_shapes_dataset(tmp_path / "shapes", n_train=4, n_test=2, seed=0)
    cfg = TrainConfig(model="tiny-text", dataset=str(folder), max_length=64, num_samples=None,
                      tokenize_cache=False)
    with pytest.raises(ConfigError, match=r"^dataset .*: the data has images but tiny-text is a "
                       r"text-only model$"):
        build_datasets(cfg, _Accelerator(), prepare_tokenizer(tiny_tokenizer))
    kto = TrainConfig(model="tiny-vl", dataset=str(folder), max_length=64, loss_type=["kto"],
                      num_samples=None,
                      tokenize_cache=False)
    with pytest.raises(ConfigError, match=r"unpaired losses \(KTO\) do not take images"):
        build_datasets(kto, _Accelerator(), prepare_tokenizer(tiny_tokenizer), processor=object())
