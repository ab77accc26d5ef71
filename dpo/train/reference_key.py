"""The cache key of the precomputed reference log-probs: what identifies the values.

The key hashes everything the values depend on: the caller's ``cache_key_parts`` (the reference
model's files, an adapter's with its base's: ``reference_key_parts``), the token ids and labels
of every row in order (``data_digest``), the numerics settings, the source of the modules in
``VALUE_CODE`` and the library versions. Used by ``dpo.train.reference_cache``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
import transformers
from accelerate import Accelerator
from datasets import Dataset

from dpo.data.vision_tokenize import processor_settings

__all__ = ["cache_key", "data_digest", "reference_key_parts", "VALUE_CODE"]

# Bump when the file layout or the meaning of the values changes: older files then miss.
CACHE_FORMAT_VERSION = 1
TOKEN_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
# Files a model directory is loaded from; their size and mtime stand in for their content.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".py", ".model", ".txt")
# The modules whose code shapes the cached numbers, all keyed by their source: any edit misses
# (a comment costs one recomputation; a changed computation read back stale costs a wrong run).
VALUE_CODE = (
    "dpo.model.forward",  # the one model call for both halves, the packed and MoE paths
    "dpo.model.probes",  # the path the probes settle: packed attention or a dense mask
    "dpo.model.padding_probe",  # the padding-free probe, which may switch to a dense mask
    "dpo.model.logprobs",  # the summed response log-probs, full or chunked
    "dpo.model.packed_attention",  # attention within each packed sequence
    "dpo.loss.variants",  # LD-DPO's length-desensitised log-probs (ld_alpha)
    "dpo.data.batching",  # the collator: padding, packing, positions, labels
    "dpo.model.loading",  # what is loaded: dtype, dropout off, a --ref-model adapter merged
    "dpo.model.lora",  # an adapter start's reference: a frozen copy or the merge, the switch
    "dpo.train.reference_cache",  # this pass: batching, autocast, what is stored
    "dpo.train.reference_key",  # what the key covers (a change there re-keys every entry)
    "dpo.model.vision",  # a vision model's image features and Qwen2.5-VL's 3-D positions
    "dpo.data.vision_batching",  # the images' pixel values and grids
)



def reference_key_parts(model_path: str, **settings) -> dict | None:
    """What identifies the reference model for the cache key, or None when it cannot be told.

    ``model_path`` is a local directory or a hub name already downloaded (a snapshot in the hub
    cache, whose path holds the commit hash). Each of its model files counts by name, size and
    modification time: a retrained or copied model misses the cache rather than hitting a stale
    entry. A PEFT adapter counts with the base model its ``adapter_config.json`` names, keyed
    the same way (the adapter's values are its base's too). ``settings`` are added as they are
    (e.g. ``dtype``, ``attn_implementation``). None (caching off; the pass is still run) when
    the path, or an adapter's base, is neither of the two.
    """
    parts = _model_parts(model_path, seen=())
    return None if parts is None else {**parts, **settings}


def _model_parts(model_path: str, seen: tuple) -> dict | None:
    directory = _model_dir(model_path)
    # An adapter chain that loops back would recurse forever (and cannot be loaded either).
    if directory is None or directory.resolve() in seen:
        return None
    files = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(MODEL_FILE_SUFFIXES):
            continue
        stat = path.stat()  # follows the hub cache's symlinks to the blobs
        files.append([path.name, stat.st_size, stat.st_mtime_ns])
    if not files:
        return None
    parts = {"model_dir": str(directory.resolve()), "model_files": files}
    adapter_config = directory / "adapter_config.json"
    if adapter_config.is_file():
        try:
            base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            return None
        # The name as the loaders read it: a relative path from the working directory.
        parts["base"] = base and _model_parts(base, (*seen, directory.resolve()))
        if not parts["base"]:
            return None
    return parts


def _model_dir(model_path: str) -> Path | None:
    directory = Path(model_path).expanduser()
    if directory.is_dir():
        return directory
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_path, local_files_only=True))
    except Exception:  # not a hub name, or not in the local cache: nothing to key on
        return None


def data_digest(dataset: Dataset) -> str:
    """sha256 of the token ids and labels of every row, in order (the values' row alignment),
    and of a vision row's image bytes (the same tokens hold other pictures).

    Read column by column from Arrow, so hashing 10⁸ tokens takes about a second.
    """
    missing = [name for name in TOKEN_COLUMNS if name not in dataset.column_names]
    if missing:
        raise ValueError(f"the dataset lacks {missing}: pass rows from data.tokenize_preferences")
    digest = hashlib.sha256(f"{len(dataset)} rows".encode())
    for table in dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow").iter(4096):
        for name in TOKEN_COLUMNS:
            column = table[name].combine_chunks()
            digest.update(name.encode())
            for values in (pc.list_value_length(column), pc.list_flatten(column)):
                digest.update(values.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    if "images" in dataset.column_names:
        for table in dataset.select_columns(["images"]).with_format("arrow").iter(256):
            column = table["images"].combine_chunks()
            digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
            for picture in pc.list_flatten(column).field("bytes").to_pylist():
                digest.update(len(picture).to_bytes(8, "little") + picture)
    return digest.hexdigest()


def cache_key(accelerator: Accelerator, dataset: Dataset, *, chunked: bool, chunk_size: int,
              batching: tuple, cache_key_parts: dict, ld_alpha: float | None = None,
              processor=None) -> str:
    """The hex key of the values `precompute_reference_logps` would compute for `dataset`;
    `processor`: a vision model's, whose settings make the pixel values."""
    code = "".join(Path(importlib.import_module(name).__file__).read_text()
                   for name in VALUE_CODE)
    parts = {
        "format": CACHE_FORMAT_VERSION,
        "data": data_digest(dataset),
        "chunked": chunked,
        # Chunking only changes the summation order, but keying on it costs nothing.
        "chunk_size": chunk_size if chunked else None,
        # Padding changes the rounding (~1e-7): a hit returns exactly what this pass would.
        "batching": list(batching),
        "mixed_precision": str(accelerator.mixed_precision),
        "device": accelerator.device.type,
        "versions": [torch.__version__, transformers.__version__],
        "code": hashlib.sha256(code.encode()).hexdigest(),
        "reference": cache_key_parts,
        "ld_alpha": ld_alpha,  # LD-DPO's log-probs are other values
        "processor": processor and processor_settings(processor),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
