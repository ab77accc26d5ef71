"""The model call of a shared-prompt batch (`dpo.data.shared_prompt`).

A row holds pairs as segments `[prompt | chosen | rejected]` (a ranking's as `[prompt | r1 | ...
| rK]`). The attention rule: a token sees the earlier tokens of its own pair, except that a
response's token never sees another response's. So the chosen tokens see exactly what they
would in `prompt + chosen`, and the rejected tokens what they would in `prompt + rejected`;
position ids (restarting the rejected response at the prompt's length) give them their own
positions, and a sliding window counts in positions. The rule goes to the model
as 4-D masks, one per kind of attention layer, which transformers passes on to each layer as
given.

The model's outputs are then read as a `[chosen; rejected]` batch (`unshare`): row i is the
pair's prompt and chosen positions, row B+i its prompt and rejected positions, so both responses'
first tokens are scored from the prompt's last position, which they share, and the prompt's
hidden states get gradient from both.
"""
from __future__ import annotations

import torch

from dpo.data.tokenize import IGNORE_INDEX
from dpo.model.packed_attention import PACKED_SDPA


class SharedPromptUnsupported(RuntimeError):
    """The model cannot take the shared-prompt attention rule (an attention implementation that
    takes no 4-D mask, or a kind of attention layer the rule does not build)."""


# Attention implementations that apply a 4-D mask as given: sdpa (and packed_sdpa, which hands
# a mask marked `shared_prompt` to sdpa) a boolean one, eager an additive one.
_MASK_KINDS = {"sdpa": "bool", PACKED_SDPA: "bool", "eager": "additive"}


def unshare(pairs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(index, labels)`, both `[K·B, T]`: `outputs.flatten(0, 1)[index]` lays the model's
    (R, L) outputs out as a right-padded `[chosen; rejected]` batch (a ranking's K slots,
    `[rank 1; rank 2; ...]`), and `labels` are that batch's. Row i is pair i's prompt then its
    chosen rest, row B+i the prompt then its rejected rest, and so on; beyond a sequence's end
    `index` points at position 0 and the label is −100."""
    rows, starts, prompt = pairs[:, :3].unbind(-1)
    rests = pairs[:, 3:]  # (B, K)
    slots = rests.shape[1]
    lengths = (prompt.unsqueeze(-1) + rests).T.flatten()  # (K·B,), slot by slot
    steps = torch.arange(int(lengths.max()), device=pairs.device)  # one host sync
    first = (rows * labels.shape[1] + starts).repeat(slots)
    # Past the prompt, slot k skips the tokens of the pair's responses before it.
    skip = (rests.cumsum(-1) - rests).T.flatten()
    after_prompt = steps >= prompt.repeat(slots).unsqueeze(-1)
    position = first.unsqueeze(-1) + steps + after_prompt * skip.unsqueeze(-1)
    inside = steps < lengths.unsqueeze(-1)
    index = torch.where(inside, position, 0)
    return index, labels.flatten()[index].masked_fill(~inside, IGNORE_INDEX)


def layer_windows(config) -> dict[str, int | None]:
    """Each kind of attention layer the model has, with its sliding window (None: full).

    Raises SharedPromptUnsupported for a kind the rule does not build (chunked attention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # one kind: windowed throughout where the config has a window
        return {"": window}
    kinds = {}
    for kind in dict.fromkeys(layer_types):
        if kind not in ("full_attention", "sliding_attention"):
            raise SharedPromptUnsupported(f"its {kind} layers")
        kinds[kind] = window if kind == "sliding_attention" else None
    return kinds


def attention_masks(config, pairs: torch.Tensor, position_ids: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The rule as the model's `attention_mask`: one (R, 1, L, L) mask, or a dict of them by
    layer kind for models that take one per kind (`config.layer_types`)."""
    kind = _MASK_KINDS.get(getattr(config, "_attn_implementation", None))
    if kind is None:
        raise SharedPromptUnsupported(
            f"attention implementation {config._attn_implementation!r} takes no 4-D mask "
            f"(supported: {', '.join(_MASK_KINDS)})")
    windows = layer_windows(config)
    num_rows, width = position_ids.shape
    device = position_ids.device
    pair = torch.full((num_rows, width), -1, dtype=torch.long, device=device)
    # 0 prompt, k the pair's k-th response (1 chosen, 2 rejected, 3.. a ranking's others)
    part = torch.zeros((num_rows, width), dtype=torch.int8, device=device)
    segments = [[] for _ in range(num_rows)]  # each row's pair segments, for packed_sdpa
    for i, (row, start, prompt, *rests) in enumerate(pairs.tolist()):  # host sync
        at = start + prompt
        for k, rest in enumerate(rests, 1):
            part[row, at:at + rest] = k
            at += rest
        pair[row, start:at] = i
        segments[row].append((start, at))
    steps = torch.arange(width, device=device)
    allowed = (pair.unsqueeze(-1) == pair.unsqueeze(-2)) & (steps.unsqueeze(-1) >= steps)
    query, key = part.unsqueeze(-1), part.unsqueeze(-2)
    allowed &= ~((query > 0) & (key > 0) & (query != key))
    # A padding position sees only itself (a query that sees nothing would give NaN).
    padding = pair < 0
    allowed = torch.where(padding.unsqueeze(-1), torch.eye(width, dtype=torch.bool,
                                                           device=device), allowed)
    distance = position_ids.unsqueeze(-1) - position_ids.unsqueeze(-2)
    masks = {}
    for name, window in windows.items():
        mask = allowed if window is None else allowed & (distance < window)
        if kind == "additive":
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
                ~mask, torch.finfo(dtype).min)
        masks[name] = mask.unsqueeze(1)
        # packed_sdpa would read the restarting position ids as sequence boundaries
        masks[name].shared_prompt = True
        masks[name].segments = segments
    return masks[""] if "" in masks else masks
