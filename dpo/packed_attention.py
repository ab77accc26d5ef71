"""SDPA that attends within each packed sequence: per sequence, or one varlen call on CUDA.

transformers keeps packed sequences apart (position ids restarting, no attention mask, no
cache) by building a dense `[L, L]` block-diagonal mask over the whole packed row. SDPA then
cannot take its causal kernel and computes every one of the L² scores, those between different
sequences included: a row of eight 250-token sequences costs 8× the attention of the sequences
apart, on SmolLM2-135M's shape as much again as the rest of the forward. `packed_sdpa` instead
cuts the row at the sequences' boundaries (read off the position ids, as transformers does) and
runs causal SDPA on each: the attention FLOPs of separate sequences, and no padding either.
On CUDA, in bf16/fp16, all sequences of the batch go to one variable-length flash-attention call
instead (`torch.nn.attention.varlen.varlen_attn`): a loop of one SDPA call per sequence and layer
would be bound by kernel launches there.

It is registered with transformers as `PACKED_SDPA`, with sdpa's mask function, and behaves as
sdpa wherever the batch is not packed (generation, padded batches): `use_packed_sdpa` switches a
model that uses sdpa over to it, unless the start-up probe found its class to need the name
"sdpa" itself (`use_dense_mask`). The boundaries are read off the position ids once per
forward (one host sync; the layers and gradient checkpointing's recomputation reuse them).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
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
    bounds = _boundaries(position_ids, query.shape[0])
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError("packed_sdpa serves causal attention only")
    dtype = _varlen_dtype(module, query, kwargs)
    if dtype is not None:
        return _varlen(module, *(x.to(dtype) for x in (query, key, value)), bounds,
                       kwargs.get("scaling")), None
    rows = []
    for row, row_bounds in enumerate(bounds):
        pieces = [sdpa_attention_forward(module, query[row:row + 1, :, start:end],
                                         key[row:row + 1, :, start:end],
                                         value[row:row + 1, :, start:end], None, **kwargs)[0]
                  for start, end in zip(row_bounds, row_bounds[1:])]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows), None


# The last position ids seen and their boundaries: every layer (and gradient checkpointing's
# recomputation) gets the same tensor, so a forward reads them off the device once. A host sync
# per layer would stall the GPU each time until the CPU has queued the next layer's kernels.
_LAST: list = [None, 0, None]  # position ids, rows, boundaries


def _boundaries(position_ids: torch.Tensor, rows: int) -> list[list[int]] | None:
    """Where each row's sequences start, and its length, e.g. `[[0, 10, 19, 24], ...]`; None if
    no row holds more than one sequence."""
    if _LAST[0] is position_ids and _LAST[1] == rows:
        return _LAST[2]
    length = position_ids.shape[-1]
    restarts = torch.diff(position_ids, dim=-1) != 1  # [R, L-1]: a sequence starts after it
    cuts = [[] for _ in range(rows)]
    for row, position in restarts.expand(rows, -1).nonzero().tolist():  # one host sync
        cuts[row].append(position + 1)
    bounds = [[0, *row_cuts, length] for row_cuts in cuts] if any(cuts) else None
    _LAST[:] = position_ids, rows, bounds
    return bounds


def _varlen_dtype(module: nn.Module, query: torch.Tensor, kwargs: dict) -> torch.dtype | None:
    """The half precision in which `_varlen` runs, or None where it does not apply. Flash
    attention: CUDA, fp16/bf16 (the query's, or autocast's: under autocast the rotary embedding
    leaves the query in fp32, and SDPA would cast it); no dropout, sliding window or
    soft-capping, which the per-sequence path handles (or refuses) as transformers' sdpa does."""
    halves = (torch.float16, torch.bfloat16)
    dtype = query.dtype
    if dtype not in halves and torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
    if (_VARLEN is None or query.device.type != "cuda" or dtype not in halves
            or (module.training and kwargs.get("dropout"))
            or kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None):
        return None
    return dtype


def _varlen(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            bounds: list[list[int]], scaling: float | None) -> torch.Tensor:
    """Causal attention within each sequence of all packed rows, in one varlen flash call:
    `[R, heads, L, d]` → `[R, L, heads, d]`. A row's tail after its last sequence counts as one
    more sequence (its outputs are never read)."""
    rows, heads, length, dim = query.shape
    starts = [row * length + start for row, row_bounds in enumerate(bounds)
              for start in row_bounds[:-1]]
    cu_seqlens = torch.tensor([*starts, rows * length], dtype=torch.int32, device=query.device)
    longest = max(end - start for row_bounds in bounds
                  for start, end in zip(row_bounds, row_bounds[1:]))
    groups = getattr(module, "num_key_value_groups", 1)

    def flat(x: torch.Tensor, repeat: int) -> torch.Tensor:  # [R, h, L, d] → [R·L, heads, d]
        return repeat_kv(x, repeat).transpose(1, 2).reshape(rows * length, heads, dim)

    out = _VARLEN(flat(query, 1), flat(key, groups), flat(value, groups), cu_seqlens, cu_seqlens,
                  longest, longest, scale=scaling, **_CAUSAL)
    return out.view(rows, length, heads, dim)


def _varlen_function():
    """torch's varlen flash attention and its causal keyword (it changed between versions)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    parameters = inspect.signature(varlen_attn).parameters
    if "scale" not in parameters:
        return None, {}
    if "window_size" in parameters:
        return varlen_attn, {"window_size": (-1, 0)}
    if "is_causal" in parameters:
        return varlen_attn, {"is_causal": True}
    return None, {}


_VARLEN, _CAUSAL = _varlen_function()
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
