"""Images of vision preference rows: read once, kept as undecoded bytes, matched to image parts.

A vision row (TRL's vision DPO layout) has an ``images`` column (or one ``image``) and
messages whose content may be a list of parts, ``{"type": "image"}`` and ``{"type": "text",
"text": ...}``. Normalised, such a row keeps each image as ``{"bytes", "path"}`` (``IMAGE``: the
file's bytes as they are, never decoded and re-encoded) in ``images``, in the order of the image
parts. A message with an image part keeps its text in ``content`` (what judges, logs and the
checks read) and its parts, without payloads, in ``fields`` under ``content_parts``
(``PARTS_KEY``), which ``messages.expand`` hands to the chat template as the content. A list
of text parts alone is plain text. A prompt with images and no image part gets one image part
per image before the text of its first user message, as TRL's ``prepare_multimodal_messages``
does. Images in ``chosen``/``rejected`` are refused: only the prompt may hold them.

Pillow (the ``vision`` extra) is imported only when an image is read.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature

from dpo.data.errors import RowProblem

IMAGE = {"bytes": Value("binary"), "path": Value("string")}
IMAGE_COLUMNS = ("images", "image")  # the list TRL reads, or one image per row (RLAIF-V)
PARTS_KEY = "content_parts"
IMAGE_PART_TYPES = ("image", "image_url")
PAYLOAD_KEYS = ("image", "image_url", "path")  # where an inline part keeps its image
# Why a vision row is skipped (in formats.DROP_REASONS).
DROP_REASONS = (
    "image_unreadable",  # a missing image file, or bytes no image decoder knows
    "image_count_mismatch",  # the images and the prompt's image parts differ in number
    "image_in_response",  # an image part in chosen/rejected: only the prompt may hold images
    "image_truncated",  # truncating the prompt would cut into an image's tokens
)


def pil_image():
    """PIL's ``Image`` module, or one line saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError('images need Pillow: pip install "dpo[vision]"') from None
    return Image


def image_column(features: Features) -> str | None:
    """The column that holds a dataset's images, ``None`` for text data."""
    return next((name for name in IMAGE_COLUMNS if name in features), None)


def vision_column(format_name: str, features: Features) -> str | None:
    """The images column of data in ``format_name``; ``ValueError`` for the formats that do not
    take images (rankings, unpaired feedback)."""
    column = image_column(features)
    if column and format_name in ("ranked", "unpaired"):
        raise ValueError(f"{format_name} rows with images are not supported: vision data trains "
                         "as pairs (prompt, chosen, rejected and images)")
    return column


def undecoded(ds):
    """``ds`` (a ``Dataset`` or a stream) with its ``Image`` columns read as ``{"bytes",
    "path"}``: a Hub dataset's JPEGs reach the tokenized rows as the bytes they are, never
    decoded and re-encoded on the way."""
    for name in IMAGE_COLUMNS:
        feature = (ds.features or {}).get(name)  # a stream may not know its features
        inner = feature.feature if isinstance(feature, List) else feature
        if isinstance(inner, ImageFeature) and inner.decode:
            undecoded_feature = ImageFeature(decode=False)
            ds = ds.cast_column(name, List(undecoded_feature) if inner is not feature
                                else undecoded_feature)
    return ds


def image_record(value, where: str) -> dict:
    """One image as ``{"bytes", "path"}`` with its bytes read, from a path, bytes, a ``datasets``
    image dict or a PIL image (saved as PNG: lossless); ``RowProblem`` (``image_unreadable``)
    naming the image and the path when it cannot be read or no decoder knows its bytes."""
    image = pil_image()
    if isinstance(value, image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    if isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    elif isinstance(value, dict) and value.get("bytes"):
        data, path = value["bytes"], value.get("path")
    else:
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, (str, Path)):
            raise RowProblem("image_unreadable", f"{where} is a {type(value).__name__}, not an "
                             "image, a path or bytes")
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise RowProblem("image_unreadable", f"{where} {path}: {e.strerror or e}") from None
    try:
        image.open(io.BytesIO(data)).size  # the header only: cheap, and a decoder knows it
    except (image.UnidentifiedImageError, OSError) as e:
        raise RowProblem("image_unreadable", f"{where}: {e}") from None
    return {"bytes": data, "path": str(path) if path else None}


def split_parts(parts: list, where: str) -> tuple[str, list[dict] | None]:
    """A content given as parts: its text, and the parts (images without payload) when one is
    an image, else ``None`` (text parts alone are plain text)."""
    text, kept, images = [], [], False
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
            kept.append({"type": "text", "text": part["text"]})
        elif kind in IMAGE_PART_TYPES:
            images = True
            kept.append({"type": "image"})
        else:
            raise RowProblem("malformed", f"{where}.content[{i}] is not a text or image part")
    return "".join(text), kept if images else None


def inline_images(value) -> list:
    """One entry per image part of a raw field's messages, in order: the part's inline payload
    (TRL's ``{"type": "image", "image": ...}``), or ``None`` for a part the images column fills.
    """
    messages = value if isinstance(value, list) else []
    contents = [m.get("content") for m in messages if isinstance(m, dict)]
    return [next((part[k] for k in PAYLOAD_KEYS if part.get(k)), None)
            for content in contents if isinstance(content, list) for part in content
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES]


def image_parts(messages: list[dict]) -> int:
    """How many image parts the normalised messages hold."""
    return sum(part["type"] == "image" for m in messages for part in _parts(m))


def _parts(message: dict) -> list[dict]:
    fields = message.get("fields")
    return json.loads(fields).get(PARTS_KEY, []) if fields else []


def with_leading_images(prompt: list[dict], count: int) -> list[dict]:
    """``prompt`` with ``count`` image parts before the text of its first user message."""
    for i, message in enumerate(prompt):
        if message["role"] == "user":
            fields = json.loads(message["fields"]) if message["fields"] else {}
            fields[PARTS_KEY] = [*[{"type": "image"}] * count,
                                 {"type": "text", "text": message["content"]}]
            return [*prompt[:i], {**message, "fields": json.dumps(fields, ensure_ascii=False)},
                    *prompt[i + 1:]]
    return prompt  # no user message: the count check refuses the row


def attach_images(row: dict, spec, prompt: list[dict], chosen: list[dict],
                  rejected: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(prompt, images)`` of a vision row in the format ``spec``: the prompt's messages
    (image parts added before a user's text when it has none) and each image's record, in
    image-part order, inline payloads of the raw prompt's parts included. ``RowProblem`` for an
    image in a response, an unreadable image, or images that disagree in number with the image
    parts."""
    check_responses(chosen=chosen, rejected=rejected)
    given = row.get(spec.images)
    given = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
    inline = inline_images(row[spec.prompt]) if spec.prompt else []
    if given and not image_parts(prompt):
        prompt = with_leading_images(prompt, len(given))
    if not inline:
        inline = [None] * image_parts(prompt)
    slots = sum(payload is None for payload in inline)
    if slots != len(given):
        raise RowProblem("image_count_mismatch", f"{len(given)} images in {spec.images} for "
                         f"{slots} image parts in the prompt")
    pending = iter(given)
    payloads = [next(pending) if payload is None else payload for payload in inline]
    return prompt, [image_record(v, f"{spec.images}[{i}]") for i, v in enumerate(payloads)]


def check_responses(**responses: list[dict]) -> None:
    """``RowProblem`` (``image_in_response``) when a response holds an image part."""
    for name, messages in responses.items():
        if image_parts(messages):
            raise RowProblem("image_in_response", f"{name} holds an image part; images belong "
                             "in the prompt")


def processor_for(rows: list[Dataset], processor, model: str):
    """The processor that tokenizes ``rows`` (normalised datasets): ``processor`` when one of
    them has images, else ``None`` (text rows render with the tokenizer as ever); ``ValueError``
    (one line) for images and a text-only model (``processor`` None)."""
    if not any(ds is not None and "images" in ds.column_names for ds in rows):
        return None
    if processor is None:
        raise ValueError(f"the data has images but {model} is a text-only model")
    return processor
