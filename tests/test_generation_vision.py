"""Generation with images, for both tiny vision-language families: left-padded batches answer as
each prompt alone and as the processor's own inputs do (Qwen2.5-VL's 3-D positions included),
the images change the answers, Qwen's rope deltas do not outlive a call, a repeated prompt
repeats its images, and the eval's samples name their prompts' images."""
import functools
import hashlib
import io
import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn

from dpo.data import IGNORE_INDEX
from dpo.eval import evaluation, generation
from dpo.eval.evaluation import Evaluator, sample_images, sample_prompts
from dpo.eval.generation import generate_answers, sample_answers
from dpo.eval.vision_inputs import image_inputs
from tests.vision_models import TOKENIZERS

FAMILIES = ("qwen2_5_vl", "gemma3")
# (question, image sizes (width, height), colours): prompts of different lengths, one with two
# images, a Qwen image of 2×2 merged patches (3-D positions differ from 1-D ones), one without.
PROMPTS = [("What is this?", [(56, 56)], ["red"]),
           ("Describe the colours of both of these pictures, please.", [(56, 28), (28, 28)],
            ["blue", "green"]),
           ("Which shape?", [(28, 28)], ["yellow"]),
           ("Say hello.", [], [])]


@functools.cache
def built(family: str):
    """`(model, processor)` of a tiny `family`, built once. Weights drawn wider than the default
    initialisation, under which every prompt gets the same greedy tokens (so no test of what a
    prompt or an image changes could fail)."""
    from dpo.demo.tiny_vision import FAMILIES as BUILDERS
    from tests.conftest import require_shared

    make_processor, make_model = BUILDERS[family]
    processor = make_processor(str(require_shared(TOKENIZERS[family])))
    model = make_model(len(processor.tokenizer))
    draws = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0, 0.1, generator=draws)
    return model, processor


def png(colour: str, size: tuple[int, int]) -> dict:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def rendered(processor, question: str, count: int) -> str:
    content = [{"type": "image"}] * count + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def processed(processor, question, sizes, colours):
    """The processor's own inputs for one prompt (its ids expanded, as tokenized rows hold them)
    and the prompt's image records."""
    from PIL import Image

    records = [png(c, s) for c, s in zip(colours, sizes)]
    pictures = [Image.open(io.BytesIO(r["bytes"])) for r in records] or None
    inputs = processor(text=[rendered(processor, question, len(sizes))], images=pictures,
                       return_tensors="pt")
    return inputs, records


def prompts_of(family: str, spec=PROMPTS):
    model, processor = built(family)
    made = [processed(processor, *prompt) for prompt in spec]
    return [inputs["input_ids"][0].tolist() for inputs, _ in made], [r for _, r in made]


def settings(batch_size: int, max_new_tokens: int = 4):
    return SimpleNamespace(max_new_tokens=max_new_tokens, generation_temperature=0.0,
                           generation_top_p=1.0, generation_batch_size=batch_size, seed=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_answers_with_images_are_each_prompts_alone_and_the_processors(family):
    """Left-padded batches of prompts with one, two or no images answer as each prompt alone,
    and as `generate` on the processor's own inputs (its pixel values, grids and modality ids)."""
    model, processor = built(family)
    ids, images = prompts_of(family)
    answer = functools.partial(generate_answers, Accelerator(cpu=True), model=model,
                               tokenizer=processor.tokenizer, prompts=ids, images=images,
                               processor=processor)
    alone = answer(cfg=settings(1))
    assert len(set(alone)) == len(alone)
    assert answer(cfg=settings(3)) == alone
    assert answer(cfg=settings(8)) == alone
    for (inputs, records), expected in zip(map(lambda p: processed(processor, *p), PROMPTS),
                                           alone):
        made = image_inputs(model, processor, [records], inputs["input_ids"])
        assert sorted(made) == sorted(set(inputs) - {"input_ids", "attention_mask"} if records
                                      else [])
        for key, value in made.items():
            assert torch.equal(value, inputs[key]), key
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        assert processor.tokenizer.decode(new, skip_special_tokens=True) == expected
    if family == "qwen2_5_vl":  # the first prompt's image has 3-D positions unlike 1-D ones
        inputs, _ = processed(processor, *PROMPTS[0])
        _, deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                               image_grid_thw=inputs["image_grid_thw"])
        assert deltas.item() != 0


@pytest.mark.parametrize("family", FAMILIES)
def test_other_images_give_other_answers(family):
    """The same question about two pictures: the answers differ (the pixels reach the model)."""
    model, processor = built(family)
    ids, images = prompts_of(family, [("Which shape?", [(28, 28)], [c]) for c in ("red", "blue")])
    assert ids[0] == ids[1]
    answers = generate_answers(Accelerator(cpu=True), settings(2, max_new_tokens=3), model,
                               processor.tokenizer, ids, images, processor)
    assert answers[0] != answers[1]


def test_qwens_rope_deltas_do_not_outlive_generation():
    """Qwen2.5-VL keeps its last `generate` call's rope deltas (one per row of that batch) and
    adds them to the positions of a forward without input ids: after generating, such a forward
    gives what it gave before."""
    model, processor = built("qwen2_5_vl")
    ids, images = prompts_of("qwen2_5_vl")
    text = torch.tensor([ids[-1]])
    embeds = model.get_input_embeddings()(text)
    with torch.no_grad():
        before = model(inputs_embeds=embeds).logits
        generate_answers(Accelerator(cpu=True), settings(4, max_new_tokens=2), model,
                         processor.tokenizer, ids, images, processor)
        assert model.model.rope_deltas is None
        after = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


class _Process:
    """Process `index` of `count`, as `share` sees it; generation runs in this one."""

    def __init__(self, index: int, count: int):
        self.process_index, self.num_processes = index, count
        self._accelerator = Accelerator(cpu=True)

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


def test_a_repeated_prompt_repeats_its_images(monkeypatch):
    """Under ZeRO-3/FSDP the second of 2 processes pads its 1 prompt of 3 with prompt 0, whose
    images come along (`synced_gpus` itself needs the processes: tests/test_parallel.py)."""
    real, calls = generation._generate, []

    def spy(accelerator, model, tokenizer, batch, *, synced, **settings):
        calls.append((batch, settings.get("images")))
        return real(accelerator, model, tokenizer, batch, synced=False, **settings)

    monkeypatch.setattr(generation, "_synced", lambda accelerator: True)
    monkeypatch.setattr(generation, "_generate", spy)
    model, processor = built("gemma3")
    ids, images = prompts_of("gemma3", PROMPTS[:3])
    alone = generate_answers(Accelerator(cpu=True), settings(1, max_new_tokens=2), model,
                             processor.tokenizer, ids, images, processor)
    calls.clear()
    second = generate_answers(_Process(1, 2), settings(2, max_new_tokens=2), model,
                              processor.tokenizer, ids, images, processor)
    assert second == alone[2:]
    assert calls == [([ids[2], ids[0]], [images[2], images[0]])]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_answers_with_images_see_their_own_images(family):
    """k sampled answers per prompt (`num_return_sequences` repeats each prompt's images too,
    one prompt with two): nearly greedy, each is the prompt's greedy answer alone."""
    model, processor = built(family)
    ids, images = prompts_of(family, PROMPTS[:3])
    greedy = generate_answers(Accelerator(cpu=True), settings(1, max_new_tokens=3), model,
                              processor.tokenizer, ids, images, processor)
    samples = sample_answers(Accelerator(cpu=True), model, processor.tokenizer, ids, k=2,
                             temperature=1e-4, top_p=1.0, max_new_tokens=3, batch_size=3,
                             seed=0, images=images, processor=processor)
    assert [[s.text for s in group] for group in samples] == [[a, a] for a in greedy]


def test_images_must_come_one_list_per_prompt_with_the_processor():
    model, processor = built("gemma3")
    ids, images = prompts_of("gemma3", PROMPTS[:2])
    cfg = settings(2)
    with pytest.raises(ValueError, match="2 sample prompts but 1 lists of images"):
        generate_answers(Accelerator(cpu=True), cfg, model, processor.tokenizer, ids, images[:1],
                         processor)
    with pytest.raises(ValueError, match="need the model's processor"):
        generate_answers(Accelerator(cpu=True), cfg, model, processor.tokenizer, ids, images)


def eval_rows(ids: list[list[int]], images=None) -> Dataset:
    """Tokenized eval rows as the data side leaves them: the prompt, then a 2-token answer."""
    rows = {"chosen_input_ids": [p + [7, 8] for p in ids],
            "chosen_labels": [[IGNORE_INDEX] * len(p) + [7, 8] for p in ids],
            "prompt_messages": [[{"role": "user", "content": f"question {i}"}]
                                for i in range(len(ids))]}
    return Dataset.from_dict(rows if images is None else {**rows, "images": images})


def test_sample_prompts_come_with_their_images_and_text_rows_without():
    ids = [[1, 2, 3], [4, 5], [6]]
    images = [[png("red", (28, 28))], [], [png("blue", (28, 28)), png("red", (28, 28))]]
    cfg = SimpleNamespace(num_sample_generations=2)
    assert sample_prompts(cfg, eval_rows(ids, images)) == ids[:2]
    assert sample_images(cfg, eval_rows(ids, images)) == images[:2]
    assert sample_prompts(cfg, eval_rows(ids)) == ids[:2]
    assert sample_images(cfg, eval_rows(ids)) is None
    assert sample_images(cfg, None) is None


@pytest.mark.parametrize("with_images", [True, False])
def test_logged_samples_name_their_prompts_images(monkeypatch, tmp_path, with_images):
    """samples.jsonl names each prompt's images (its path, else a short hash of its bytes) beside
    the policy's answer to it, and shows each image as one image token; text rows' samples keep
    their fields."""
    model, processor = built("gemma3")
    ids, images = prompts_of("gemma3", PROMPTS[:2] if with_images else
                             [("Say hello.", [], []), ("Say goodbye.", [], [])])
    if with_images:
        images[1][0]["path"] = "pictures/blue.png"
    rows = eval_rows(ids, images if with_images else None)
    monkeypatch.setattr(evaluation, "evaluate", lambda *args: {"eval/loss": 0.5})
    cfg = SimpleNamespace(dataset=["pairs"], judge=None, output_dir=str(tmp_path), seed=0,
                          num_sample_generations=2, max_new_tokens=2, generation_batch_size=2,
                          generation_temperature=0.0, generation_top_p=1.0)
    logger = SimpleNamespace(log=lambda step, results: None,
                             progress=SimpleNamespace(write=lambda line: None))
    evaluator = Evaluator(Accelerator(cpu=True), cfg, logger, processor.tokenizer,
                          SimpleNamespace(dataset=rows), sample_prompts(cfg, rows), None,
                          images=sample_images(cfg, rows), processor=processor)
    evaluator.run(model, None, step=3)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    alone = generate_answers(Accelerator(cpu=True), settings(1, max_new_tokens=2), model,
                             processor.tokenizer, ids, images if with_images else None, processor)
    assert [s["policy"] for s in samples] == alone
    if with_images:
        digest = hashlib.sha256(images[0][0]["bytes"]).hexdigest()[:12]
        other = hashlib.sha256(images[1][1]["bytes"]).hexdigest()[:12]
        assert [s["images"] for s in samples] == [[f"sha256:{digest}"],
                                                  ["pictures/blue.png", f"sha256:{other}"]]
        assert list(samples[0]) == ["step", "prompt", "images", "policy"]
        # Each image shows as one image token, not the run the processor expanded it to.
        soft = processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id)
        assert [s["prompt"].count(soft) for s in samples] == [1, 2]
        assert samples[0]["prompt"].replace(soft, "") == processor.tokenizer.decode(
            [t for t in ids[0] if t != model.config.image_token_id])
    else:
        assert list(samples[0]) == ["step", "prompt", "policy"]
