"""SDPA that attends within each packed sequence: per sequence, or one varlen call on CUDA.

transformers keeps packed sequences apart (position ids restarting, no attention mask, no
cache) by building a dense `[L, L]` block-diagonal mask over the whole packed row. SDPA then
cannot take its causal kernel and computes every one of the L² scores, those between different
sequences included: a row of eight 250-token sequences costs 8× the attention of the sequences
apart, on SmolLM2-135M's shape as much again as the rest of the forward. `packed_sdpa` instead
cuts the row at the sequences' boundaries (read off the position ids, as transformers does) and
runs causal SDPA on each: the attention FLOPs of separate sequences, and no padding either.
Where the flash kernel runs (CUDA on sm80 or newer, bf16/fp16, a head size that is a multiple
of 8 up to 256: `_flash_runs`), all sequences of the batch go to one variable-length
flash-attention call instead (`torch.nn.attention.varlen.varlen_attn`): a loop of one SDPA call
per sequence and layer would be bound by kernel launches there.

A sliding-window layer (transformers passes it `sliding_window=w`) keeps its window on both
paths, as transformers' own mask defines it: query i sees key j of its sequence iff
i − w < j ≤ i. Per sequence, a sequence longer than w gets that window as a boolean mask; the
varlen call gets `window_size=(w − 1, 0)`.

It is registered with transformers as `PACKED_SDPA`, with sdpa's mask function, and behaves as
sdpa wherever the batch is not packed (generation, padded batches): `use_packed_sdpa` switches a
model that uses sdpa over to it, unless the start-up probe found its class to need the name
"sdpa" itself (`use_dense_mask`). The boundaries are read off the position ids once per
forward (one host sync; the layers and gradient checkpointing's recomputation reuse them).
"""
from __future__ import annotations

import functools
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
    if getattr(attention_mask, "shared_prompt", False):  # dpo.model.shared_prompt's rule
        return _by_segment(module, query, key, value, attention_mask, **kwargs), None
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
    window = kwargs.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"packed_sdpa: sliding_window must be a positive int, got {window!r}")
    dtype = _varlen_dtype(module, query, value, kwargs)
    if dtype is not None:
        return _varlen(module, *(x.to(dtype) for x in (query, key, value)), bounds,
                       kwargs.get("scaling"), window), None
    rows = []
    for row, row_bounds in enumerate(bounds):
        pieces = [sdpa_attention_forward(module, query[row:row + 1, :, start:end],
                                         key[row:row + 1, :, start:end],
                                         value[row:row + 1, :, start:end],
                                         _window_mask(end - start, window, query.device),
                                         **kwargs)[0]
                  for start, end in zip(row_bounds, row_bounds[1:])]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows), None


def _by_segment(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Shared-prompt rows pair by pair: the rule's mask is block-diagonal over a row's pair
    segments, so each segment's queries against its own keys, under its block of the mask, give
    what one call over the row does, without the scores between pairs (the row's length squared
    against the sum of its segments' lengths squared). Padding after the last segment gets 0."""
    rows = []
    for row, segments in enumerate(mask.segments):
        pieces = [sdpa_attention_forward(module, query[row:row + 1, :, start:end],
                                         key[row:row + 1, :, start:end],
                                         value[row:row + 1, :, start:end],
                                         mask[row:row + 1, :, start:end, start:end],
                                         **kwargs)[0]
                  for start, end in segments]
        end = segments[-1][1] if segments else 0
        if end < query.shape[2]:
            pieces.append(query.new_zeros(1, query.shape[2] - end, query.shape[1],
                                          value.shape[-1]))
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows)


def _window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """`[1, 1, length, length]` bool: query i sees key j iff i − window < j ≤ i (transformers'
    `sliding_window_causal_mask_function`); None (SDPA's causal kernel) where the window does not
    bind: no window, or a sequence no longer than it."""
    if window is None or length <= window:
        return None
    steps = torch.arange(length, device=device)
    distance = steps[:, None] - steps[None, :]  # i − j
    return ((distance >= 0) & (distance < window))[None, None]


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


def _varlen_dtype(module: nn.Module, query: torch.Tensor, value: torch.Tensor, kwargs: dict
                  ) -> torch.dtype | None:
    """The half precision in which `_varlen` runs, or None where it does not apply. Flash
    attention: fp16/bf16 (the query's, or autocast's: under autocast the rotary embedding leaves
    the query in fp32, and SDPA would cast it) where its kernel runs (`_flash_runs`); no dropout
    or soft-capping, which the per-sequence path handles (or refuses) as transformers' sdpa does;
    a sliding window only where torch's varlen call takes one."""
    halves = (torch.float16, torch.bfloat16)
    dtype = query.dtype
    if dtype not in halves and torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
    if (_VARLEN is None or dtype not in halves
            or (module.training and kwargs.get("dropout"))
            or (kwargs.get("sliding_window") is not None and _CAUSAL != _WINDOWED)
            or kwargs.get("softcap") is not None
            or value.shape[-1] != query.shape[-1]
            or not _flash_runs(query.device, query.shape[-1])):
        return None
    return dtype


def _flash_runs(device: torch.device, head_dim: int) -> bool:
    """Does torch's flash kernel (what `varlen_attn` calls) run here? It refuses devices before
    Ampere (sm80: not a T4 or V100) and head sizes over 256 or not a multiple of 8 (torch 2.13's
    `flash_api.cpp`, forward and backward). ROCm's kernels have other limits and are not tried."""
    index = _cuda_index(device)
    return (index is not None and head_dim % 8 == 0 and head_dim <= 256
            and _ampere_or_newer(index))


def _cuda_index(device: torch.device) -> int | None:
    """The CUDA device's index, None for any other device."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _ampere_or_newer(index: int) -> bool:
    """Once per device: asked per layer call, it would query the driver every time."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 0)


def _varlen(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            bounds: list[list[int]], scaling: float | None, window: int | None = None
            ) -> torch.Tensor:
    """Causal attention within each sequence of all packed rows, in one varlen flash call:
    `[R, heads, L, d]` → `[R, L, heads, d]`; within `window` keys back, if given. A row's tail
    after its last sequence counts as one more sequence (its outputs are never read)."""
    rows, heads, length, dim = query.shape
    starts = [row * length + start for row, row_bounds in enumerate(bounds)
              for start in row_bounds[:-1]]
    cu_seqlens = torch.tensor([*starts, rows * length], dtype=torch.int32, device=query.device)
    longest = max(end - start for row_bounds in bounds
                  for start, end in zip(row_bounds, row_bounds[1:]))
    groups = getattr(module, "num_key_value_groups", 1)

    def flat(x: torch.Tensor, repeat: int) -> torch.Tensor:  # [R, h, L, d] → [R·L, heads, d]
        return repeat_kv(x, repeat).transpose(1, 2).reshape(rows * length, heads, dim)

    # Flash's window (left, right) keeps key j for query i iff i − left ≤ j ≤ i + right; −1 is
    # unbounded. (w − 1, 0) is transformers' i − w < j ≤ i.
    causal = ({"window_size": (-1, 0) if window is None else (window - 1, 0)}
              if _CAUSAL == _WINDOWED else {"is_causal": True})
    out = _VARLEN(flat(query, 1), flat(key, groups), flat(value, groups), cu_seqlens, cu_seqlens,
                  longest, longest, scale=scaling, **causal)
    return out.view(rows, length, heads, dim)


_WINDOWED = "window_size"


def _varlen_function():
    """torch's varlen flash attention and the keyword that makes it causal: `window_size`
    (which also takes a sliding window; torch 2.13) or, in earlier versions, `is_causal`."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, None
    parameters = inspect.signature(varlen_attn).parameters
    if "scale" not in parameters:
        return None, None
    for keyword in (_WINDOWED, "is_causal"):
        if keyword in parameters:
            return varlen_attn, keyword
    return None, None


_VARLEN, _CAUSAL = _varlen_function()
AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


# Model classes whose code tests for the name "sdpa" itself (Falcon) and so would take another
# path under ours: `dpo.model.padding_probe.check_padding_free` finds them and adds them here.
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


def attention_span(config) -> int | None:
    """The longest limit on how far back a layer of a model with `config` attends: its sliding
    window (Mistral, Gemma 2/3, Qwen2 with `use_sliding_window`, Phi-3, ...) or its attention
    chunk (Llama 4), the larger if both; None for full causal attention. Only sequences longer
    than this show a packed path that drops the limit, so the start-up probe reaches past it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [getattr(text, name, None) for name in ("sliding_window", "attention_chunk_size")]
    limits = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return max(limits) if limits else None


# The probe's long pair: its chosen response ends this many tokens past the model's attention
# limit w, its rejected one at 2w (either may show a dropped window more, unpredictably which).
PROBE_MARGIN = 24


def probe_length(model: nn.Module, max_length: int | None) -> int | None:
    """The longest probe sequence for `model` (unwrapped): twice its `attention_span` (at least
    `PROBE_MARGIN` past it), at most `max_length`, as the run's rows never get longer; None
    where the model has no limit or the run's sequences never pass it."""
    span = attention_span(model.config)
    if span is None or (max_length is not None and max_length <= span):
        return None
    longest = span + max(span, PROBE_MARGIN)
    return longest if max_length is None else min(longest, max_length)
