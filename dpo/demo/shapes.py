"""A small vision preference set made on the spot: a drawn shape, a question about its colour,
the right answer (chosen) and a wrong one (rejected).

Deterministic from the seed (numpy's and Python's seeded generators; PIL draws and PNG-encodes
the same pixels every time). Images are tiny (28 px by default: a 2 x 2 grid of 14-px patches,
one Qwen2.5-VL image token), on a background of light pixel noise, so that the answer is in the
shape's pixels and a tiny vision model learns it from them (the colour is the easiest signal).

``write_shapes_dataset`` writes ``train.parquet`` and ``test.parquet`` into a folder, images
embedded as PNG bytes (a ``datasets`` ``Image`` column, as ``push_to_hub`` stores one): train
with ``--dataset <folder>`` (``datasets.load_dataset`` reads the two splits from the file
names; the test split is the eval split), or pass one of the files.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What colour is the shape?"
PART = {"type": Value("string"), "text": Value("string")}
MESSAGES = List({"role": Value("string"), "content": List(PART)})
FEATURES = Features({"images": List(ImageFeature()), "prompt": MESSAGES, "chosen": MESSAGES,
                     "rejected": MESSAGES})


def draw_shape(shape: str, colour: str, size: int, rng: random.Random, noise: np.ndarray):
    """A PIL image: ``shape`` in ``colour`` at a random place and scale on ``noise`` (a light
    ``(size, size, 3)`` uint8 background)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise ImportError('the shapes set needs Pillow: pip install "dpo[vision]"') from None
    picture = Image.fromarray(noise)
    extent = rng.randint(size // 2, size - 4)
    x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x, y, x + extent - 1, y + extent - 1)
    pen = ImageDraw.Draw(picture)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(x + extent // 2, y), (x, y + extent - 1), (x + extent - 1, y + extent - 1)],
                    fill=COLOURS[colour])
    return picture


def _says(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": [{"type": "text", "text": text}]}]


def shape_pairs(n: int, seed: int = 0, size: int = 28) -> Dataset:
    """``n`` rows in TRL's conversational vision layout: ``images`` (one drawn shape, an
    ``Image`` column), ``prompt`` (a user turn of an image part and the question), ``chosen``
    (the shape's colour, ``"Red."``) and ``rejected`` (another colour)."""
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    rows = {name: [] for name in FEATURES}
    for _ in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        wrong = rng.choice([c for c in COLOURS if c != colour])
        noise = pixels.integers(200, 256, (size, size, 3), dtype=np.uint8)
        rows["images"].append([draw_shape(shape, colour, size, rng, noise)])
        rows["prompt"].append([{"role": "user", "content": [
            {"type": "image", "text": None}, {"type": "text", "text": QUESTION}]}])
        rows["chosen"].append(_says("assistant", f"{colour.capitalize()}."))
        rows["rejected"].append(_says("assistant", f"{wrong.capitalize()}."))
    return Dataset.from_dict(rows, features=FEATURES)


def write_shapes_dataset(directory: str | Path, n_train: int, n_test: int, seed: int = 0
                         ) -> Path:
    """Write ``n_train`` rows to ``<directory>/train.parquet`` and ``n_test`` other rows (their
    own seed) to ``test.parquet``; returns the folder, for ``--dataset``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shape_pairs(n_train, seed).to_parquet(str(directory / "train.parquet"))
    shape_pairs(n_test, seed + 1_000_003).to_parquet(str(directory / "test.parquet"))
    return directory
