"""Vision-language models in the concatenated forward: each pair's images encoded once.

A vision batch is a text batch (`input_ids` stacked `[chosen; rejected]`, or packed, or
shared-prompt rows) plus each pair's images, once per pair, in pair order: `pixel_values`,
Qwen2.5-VL's `image_grid_thw` (one row per image) and `image_counts` (B,) images per pair. The
per-token modality the models take (`mm_token_type_ids`, `token_type_ids`) is read off the image
placeholder ids, so packing and prompt sharing lay it out with the ids.

`image_inputs` runs the vision tower once on the pairs' images and hands the features to the
model as `mm_encoder_outputs`, repeated once per sequence of a pair that holds them (K for
`[chosen; rejected]`, 1 for a shared prompt), in the order the image tokens appear row by row;
the gradient reaching the tower is the sum over those uses. Qwen2.5-VL's 3-D rotary positions are
computed here per sequence (`rope_positions`), as the model computes them for a sequence alone,
so they are right for padded, packed and shared-prompt rows alike. Gemma 3's image tokens attend
to each other both ways, which packed rows and shared prompts (causal only) cannot do: the
start-up probes refuse those layouts for it (`dpo.model.padding_probe`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from dpo.config import ConfigError


@dataclass(frozen=True)
class VisionFamily:
    """What differs between vision-language families, by `config.model_type`."""

    frozen: tuple[str, ...]  # attributes of the body (`model.model`): the tower and projector
    rope_3d: bool  # multimodal rotary positions (`get_rope_index`) instead of 1-D ones
    bidirectional: bool  # image tokens attend to each other both ways
    # the forward's per-token modality argument (1 on image tokens); Qwen's is only read to
    # compute positions, which `rope_positions` passes instead
    modality_key: str


FAMILIES = {
    # Qwen's merger (its projector) lives inside `visual`
    "qwen2_5_vl": VisionFamily(("visual",), rope_3d=True, bidirectional=False,
                               modality_key="mm_token_type_ids"),
    "gemma3": VisionFamily(("vision_tower", "multi_modal_projector"), rope_3d=False,
                           bidirectional=True, modality_key="token_type_ids"),
}


def vision_family(model: nn.Module) -> VisionFamily | None:
    """The family of a vision-language model, None for a text-only one; ConfigError (one line)
    for a vision-language model whose family this module does not know."""
    return family_of(extract_model_from_parallel(model).config)


def family_of(config) -> VisionFamily | None:
    """`vision_family` by a model's config."""
    if getattr(config, "vision_config", None) is None:
        return None
    if config.model_type not in FAMILIES:
        raise ConfigError(f"{config.model_type} is a vision-language model family dpo does not "
                          f"support yet (supported: {', '.join(FAMILIES)})")
    return FAMILIES[config.model_type]


def vision_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(name, module)` of the vision tower and projector, named as in `model.named_modules()`;
    empty for a text-only model."""
    family = vision_family(model)
    if family is None:
        return []
    body = model.base_model
    prefix = next(name for name, module in model.named_modules() if module is body)
    return [(f"{prefix}.{name}" if prefix else name, getattr(body, name))
            for name in family.frozen]


def freeze_vision_tower(model: nn.Module) -> None:
    """The vision tower and projector keep their weights (requires_grad False), as
    LLaMA-Factory and TRL's recipes have them by default: their features are then computed
    without autograd (`image_inputs`). Nothing to do for a text-only model."""
    for _, module in vision_modules(model):
        module.requires_grad_(False)


def image_inputs(model: nn.Module, batch: dict[str, torch.Tensor], slots: int,
                 index: torch.Tensor | None = None) -> dict:
    """The model's image inputs for `batch`: `mm_encoder_outputs` (each pair's images encoded
    once, laid out in the order their tokens appear in the rows), and Qwen2.5-VL's 3-D
    `position_ids` or Gemma 3's `token_type_ids`.

    Args:
        slots: sequences per pair (2 for `[chosen; rejected]`, K for a ranking).
        index: for packed or shared-prompt rows, `concatenated_forward`'s index laying the rows
            out as a padded `[K·B, T]` batch (`_unpack`, `unshare`); None for a padded batch.
    The tower runs under no_grad when none of its (or the projector's) parameters trains.
    """
    unwrapped = extract_model_from_parallel(model)
    family = vision_family(unwrapped)
    if family is None:
        raise ConfigError(f"{type(unwrapped).__name__} is a text-only model: it cannot take "
                          "images")
    body = unwrapped.base_model
    pairs = (batch["input_ids"].shape[0] if index is None else index.shape[0]) // slots
    counts = batch.get("image_counts")
    counts = [1] * pairs if counts is None else counts.tolist()
    order = _pair_order(batch, slots, pairs, index)  # the pair of each image-holding sequence
    grid = batch.get("image_grid_thw")
    trains = any(p.requires_grad for name in family.frozen
                 for p in getattr(body, name).parameters())
    # An adapter-off reference (LoRA) runs its tower with the adapter off too.
    with getattr(unwrapped, "active", contextlib.nullcontext)(), torch.set_grad_enabled(
            trains and torch.is_grad_enabled()):
        extra = () if grid is None else (grid,)
        encoded = body.get_image_features(batch["pixel_values"], *extra, return_dict=True)
    images = _by_pair(list(encoded.pooler_output), counts)  # one feature tensor per image
    laid_out = [features for pair in order for features in images[pair]]
    inputs = {}
    if family.rope_3d:
        encoded.pooler_output = tuple(laid_out)
        # the padded layout's rows hold each slot's pairs' images in pair order
        inputs["position_ids"] = rope_positions(unwrapped, batch, grid.repeat(slots, 1), index)
    else:
        encoded.pooler_output = torch.stack(laid_out)
        inputs[family.modality_key] = image_tokens(unwrapped, batch["input_ids"])
    return {"mm_encoder_outputs": {"image": encoded}, **inputs}


# Config fields naming the ids of image and video placeholders and their delimiters.
_SPECIAL_ID_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id",
                      "vision_end_token_id", "boi_token_id", "eoi_token_id", "boi_token_index",
                      "eoi_token_index", "image_token_index")


def special_ids(config) -> list[int]:
    """The ids a vision-language model reserves for images and videos (random probe tokens
    must avoid them: a stray image token without its image is an error); [] for a text-only
    model."""
    if getattr(config, "vision_config", None) is None:
        return []
    return sorted({i for name in _SPECIAL_ID_FIELDS
                   if isinstance(i := getattr(config, name, None), int)})


def probe_image(model: nn.Module, generator: torch.Generator) -> tuple[list[int], dict]:
    """A random image for the start-up probes, as `model`'s processor would give it, without
    one: `(tokens, inputs)`, the prompt's tokens for the image (placeholders between the
    family's delimiters) and the batch keys (`pixel_values`, Qwen's `image_grid_thw`).
    Random pixels, so that image tokens differ and how they attend matters."""
    config = extract_model_from_parallel(model).config
    vision = config.vision_config
    channels = getattr(vision, "in_channels", getattr(vision, "num_channels", 3))
    if family_of(config).rope_3d:  # a 4×6 grid of patches, merged 2×2 into 6 tokens
        merge = vision.spatial_merge_size
        grid = torch.tensor([[1, 2 * merge, 3 * merge]])
        patch = channels * vision.temporal_patch_size * vision.patch_size ** 2
        inputs = {"pixel_values": torch.randn(int(grid.prod()), patch, generator=generator),
                  "image_grid_thw": grid}
        count = int(grid.prod()) // merge ** 2
    else:
        size = vision.image_size
        inputs = {"pixel_values": torch.randn(1, channels, size, size, generator=generator)}
        count = config.mm_tokens_per_image
    start = _first_id(config, "vision_start_token_id", "boi_token_id", "boi_token_index")
    end = _first_id(config, "vision_end_token_id", "eoi_token_id", "eoi_token_index")
    tokens = [start] + [config.image_token_id] * count + [end]
    return [i for i in tokens if i is not None], inputs


def _first_id(config, *names: str) -> int | None:
    return next((i for name in names if isinstance(i := getattr(config, name, None), int)), None)


def image_tokens(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """1 on image placeholder tokens, 0 elsewhere: the modality ids the processors make."""
    return (input_ids == model.config.image_token_id).long()


def _by_pair(items: list, counts: list[int]) -> list[list]:
    """`items` (one per image, pair by pair) grouped by pair."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [items[s:s + n] for s, n in zip(starts, counts)]


def _pair_order(batch: dict, slots: int, pairs: int, index: torch.Tensor | None) -> list[int]:
    """Which pair each sequence (or shared prompt) holding images belongs to, in the order the
    model meets their image tokens: row by row, left to right."""
    if "shared_pairs" in batch:  # one prompt per pair: (row, start, prompt, rests...)
        shared = batch["shared_pairs"]
        first = shared[:, 0] * batch["input_ids"].shape[1] + shared[:, 1]
        return first.argsort().tolist()
    sequence_pairs = torch.arange(pairs).repeat(slots)  # [chosen; rejected] order
    if index is None:
        return sequence_pairs.tolist()
    return sequence_pairs[index[:, 0].argsort().cpu()].tolist()  # by each one's flat start


def rope_positions(model: nn.Module, batch: dict[str, torch.Tensor], grid: torch.Tensor,
                   index: torch.Tensor | None) -> torch.Tensor:
    """Qwen2.5-VL's multimodal rotary positions, each sequence's computed as the model computes
    them for that sequence alone (`get_rope_index`): `[3, R, L]` for a padded batch; for packed
    or shared-prompt rows `[4, R, L]`, the row's own text positions (restarting at each
    sequence, which is how transformers and packed_sdpa find the boundaries) first.

    `grid`: one row per image in the order the image tokens appear in the padded layout."""
    input_ids, body = batch["input_ids"], model.base_model
    types = image_tokens(model, input_ids)
    if index is None:
        positions, _ = body.get_rope_index(input_ids, types, image_grid_thw=grid,
                                           attention_mask=batch.get("attention_mask"))
        return positions
    # Lay the rows out as a padded batch, compute there, and write back where each token lies.
    # Past a sequence's end `index` points at flat position 0, which inside a sequence only
    # its first column can (the first token of row 0).
    inside = torch.ones_like(index, dtype=torch.bool)
    inside[:, 1:] = index[:, 1:] != 0
    padded_ids = input_ids.flatten()[index]
    padded_types = types.flatten()[index].masked_fill(~inside, 0)
    positions, _ = body.get_rope_index(padded_ids, padded_types, image_grid_thw=grid,
                                       attention_mask=inside.long())
    rows = input_ids.new_zeros(3, input_ids.numel())
    # A shared prompt's tokens appear in every slot's row, with the same positions.
    rows[:, index[inside]] = positions[:, inside]
    text = batch["position_ids"].unsqueeze(0)
    return torch.cat([text, rows.view(3, *input_ids.shape)])


def check_vision_data(accelerator, cfg, train_parts: list, eval_parts: list) -> None:
    """ConfigError (one line) for a mixture of datasets with and without images (they cannot be
    batched together), and for pairs without an image in a vision dataset where a step whose
    batch has none would hang or fail: under ZeRO-3 or FSDP the tower's shards are
    gathered by the processes that run it, which then wait forever for one that skips it; under
    DDP a tower that trains gets no gradient on that process. One process, or DDP with the tower
    frozen, takes them."""
    import pyarrow.compute as pc
    from accelerate.utils import DistributedType

    if len({"images" in part.column_names for part in train_parts}) > 1:
        raise ConfigError("a mixture of datasets with and without images: train on one kind")
    if not any("images" in part.column_names for part in train_parts) or \
            accelerator.num_processes == 1:
        return
    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3)
    if not sharded and cfg.freeze_vision_tower:
        return
    imageless = sum(pc.sum(pc.equal(pc.list_value_length(
        part.select_columns(["images"]).with_format("arrow")[:]["images"]), 0)).as_py() or 0
        for part in [*train_parts, *eval_parts] if "images" in part.column_names)
    if imageless:
        setting = "ZeRO-3 and FSDP shard" if sharded else "DDP with a trained tower syncs"
        raise ConfigError(f"pairs without an image: {imageless}; {setting} the vision tower "
                          "across processes, so every pair needs one (drop those rows, or run "
                          "on one process)")
