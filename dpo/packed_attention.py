"""SDPA that attends within each packed sequence, one causal kernel call per sequence.

transformers keeps packed sequences apart (position ids restarting, no attention mask, no
cache) by building a dense `[L, L]` block-diagonal mask over the whole packed row. SDPA then
cannot take its causal kernel and computes every one of the L² scores, those between different
sequences included: a row of eight 250-token sequences costs 8× the attention of the sequences
apart, on SmolLM2-135M's shape as much again as the rest of the forward. `packed_sdpa` instead
cuts the row at the sequences' boundaries (read off the position ids, as transformers does) and
runs causal SDPA on each: the attention FLOPs of separate sequences, and no padding either.

It is registered with transformers as `PACKED_SDPA`, with sdpa's mask function, and behaves as
sdpa wherever the batch is not packed (generation, padded batches): `use_packed_sdpa` switches a
model that uses sdpa over to it, unless the start-up probe found its class to need the name
"sdpa" itself (`use_dense_mask`). Each layer finds the boundaries itself (one host sync), so the
recomputation of gradient checkpointing sees them too.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "dpo_packed_sdpa"


def packed_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: `query` `[R, heads, L, d]`, output
    `[R, L, heads, d]`. Packed rows (position ids that restart within a row) go sequence by
    sequence; anything else goes to transformers' sdpa unchanged."""
    position_ids = kwargs.pop("position_ids", None)
    # A mask the caller passed is not a packed batch's: transformers reads packing only
    # without one. A dense block mask built from the position ids is dropped: it is redone
    # below, exactly, without the scores between sequences.
    if position_ids is None or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    restarts = torch.diff(position_ids, dim=-1) != 1  # [R, L-1]: a sequence starts after it
    if not bool(restarts.any()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError("packed_sdpa serves causal attention only")
    rows = []
    for row in range(query.shape[0]):
        cuts = (torch.nonzero(restarts[min(row, restarts.shape[0] - 1)]).flatten() + 1).tolist()
        bounds = [0, *cuts, query.shape[2]]
        pieces = [sdpa_attention_forward(module, query[row:row + 1, :, start:end],
                                         key[row:row + 1, :, start:end],
                                         value[row:row + 1, :, start:end], None, **kwargs)[0]
                  for start, end in zip(bounds, bounds[1:])]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


# Model classes whose code tests for the name "sdpa" itself (Falcon) and so would take another
# path under ours: `dpo.forward.check_padding_free` finds them and adds them here.
DENSE_MASK_ONLY: set[type] = set()


def use_packed_sdpa(model: nn.Module) -> None:
    """Switch `model` (unwrapped) from sdpa to `packed_sdpa`, unless its class is in
    `DENSE_MASK_ONLY`; any other attention is left as it is (eager and flex_attention keep
    packed sequences apart with transformers' mask)."""
    if model.config._attn_implementation == "sdpa" and type(model) not in DENSE_MASK_ONLY:
        model.config._attn_implementation = PACKED_SDPA


def use_dense_mask(model: nn.Module) -> None:
    """Back from `packed_sdpa` to transformers' sdpa (dense block mask) for `model`'s class."""
    DENSE_MASK_ONLY.add(type(model))
    if model.config._attn_implementation == PACKED_SDPA:
        model.config._attn_implementation = "sdpa"
