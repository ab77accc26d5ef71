"""`packed_sdpa`: attention within each packed sequence, per sequence (CPU) or in one varlen
flash call (CUDA, half precision)."""
import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dpo.model import packed_attention
from dpo.model.packed_attention import packed_sdpa

# Two packed rows of 24 positions: row 0 holds sequences of 10, 9 and 5 tokens; row 1 holds 7 and
# 11, then a 6-position tail of padding (its position ids restart too, as the collator's do).
LENGTHS = [[10, 9, 5], [7, 11, 6]]


class Attention(nn.Module):
    """What packed_sdpa reads off a transformers attention module."""

    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def packed_inputs(device, dtype, heads=4, kv_heads=2, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    length = sum(LENGTHS[0])
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in LENGTHS])
    q, k, v = (torch.randn(len(LENGTHS), h, length, dim, generator=generator)
               .to(device, dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    return Attention(heads // kv_heads), q, k, v, position_ids.to(device)


def separately(module, q, k, v, **kwargs):
    """Each sequence on its own through transformers' causal sdpa: `[R, L, heads, d]`."""
    rows = []
    for row, lengths in enumerate(LENGTHS):
        pieces, start = [], 0
        for n in lengths:
            piece = slice(start, start + n)
            pieces.append(sdpa_attention_forward(module, q[row:row + 1, :, piece],
                                                 k[row:row + 1, :, piece],
                                                 v[row:row + 1, :, piece], None, **kwargs)[0])
            start += n
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows)


def relative(got, want):
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


def test_packed_rows_attend_within_each_sequence_only():
    module, q, k, v, position_ids = packed_inputs("cpu", torch.float32)
    got, _ = packed_sdpa(module, q, k, v, None, position_ids=position_ids)
    want = separately(module, q, k, v)
    assert got.shape == (2, 24, 4, 16)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # A whole-row causal attention (what ignoring the boundaries gives) is far off.
    leaky = sdpa_attention_forward(module, q, k, v, None, is_causal=True)[0]
    assert relative(leaky, want) > 0.1


def reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, **causal):
    """What `varlen_attn` computes, sequence by sequence in plain SDPA: `[T, heads, d]`."""
    assert cu_q.dtype == torch.int32 and query.shape[1] == key.shape[1]  # heads repeated
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    out = []
    for start, end in zip(cu_q.tolist(), cu_q[1:].tolist()):
        q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale)[0].transpose(0, 1))
    return torch.cat(out)


def test_the_varlen_call_is_laid_out_right(monkeypatch):
    """The varlen path's layout (flattened rows, cumulative boundaries, repeated key/value heads
    for grouped-query attention, the rows' tails) against sequence-by-sequence SDPA, on CPU with
    a plain-SDPA stand-in for the flash kernel."""
    calls = []
    monkeypatch.setattr(packed_attention, "_VARLEN",
                        lambda *a, **kw: calls.append(1) or reference_varlen(*a, **kw))
    monkeypatch.setattr(packed_attention, "_varlen_dtype", lambda *a: torch.float32)
    module, q, k, v, position_ids = packed_inputs("cpu", torch.float32)
    got, _ = packed_sdpa(module, q, k, v, None, position_ids=position_ids, scaling=0.3)
    want = separately(module, q, k, v, scaling=0.3)
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_boundaries_are_read_once_per_forward(monkeypatch):
    """Every layer gets the same position ids: one read (host sync) for all of them."""
    diffs = []
    diff = torch.diff
    monkeypatch.setattr(torch, "diff", lambda *a, **kw: diffs.append(1) or diff(*a, **kw))
    module, q, k, v, position_ids = packed_inputs("cpu", torch.float32)
    first = [packed_sdpa(module, q, k, v, None, position_ids=position_ids)[0] for _ in range(3)]
    assert len(diffs) == 1
    packed_sdpa(module, q, k, v, None, position_ids=position_ids.clone())  # the next batch
    assert len(diffs) == 2
    torch.testing.assert_close(first[2], separately(module, q, k, v))


def test_no_varlen_path_on_cpu_or_in_fp32(monkeypatch):
    """Flash attention runs on CUDA in half precision only; elsewhere the per-sequence path."""
    calls = []
    monkeypatch.setattr(packed_attention, "_VARLEN", lambda *a, **k: calls.append(a))
    module, q, k, v, position_ids = packed_inputs("cpu", torch.bfloat16)
    packed_sdpa(module, q, k, v, None, position_ids=position_ids)
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "autocast"])
def test_varlen_equals_per_sequence_sdpa_on_cuda(monkeypatch, dtype):
    """bf16 and fp16 inputs, and fp32 ones under bf16 autocast (as the rotary embedding leaves
    the query under Accelerate's mixed precision): one varlen call, close to fp32."""
    if packed_attention._VARLEN is None:
        pytest.skip(f"torch {torch.__version__} has no usable torch.nn.attention.varlen")
    calls, varlen = [], packed_attention._VARLEN
    monkeypatch.setattr(packed_attention, "_VARLEN",
                        lambda *a, **kw: calls.append(1) or varlen(*a, **kw))
    module, q, k, v, position_ids = packed_inputs(
        "cuda", torch.float32 if dtype == "autocast" else dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "autocast"):
        got, _ = packed_sdpa(module, q, k, v, None, position_ids=position_ids)
    grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    # The same in fp32, sequence by sequence: bf16 operands land within ~1e-2 of it.
    exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = separately(module, *exact)
    want_grads = torch.autograd.grad(want.square().sum(), exact)
    assert relative(got, want) < 1e-2
    for g, w in zip(grads, want_grads):
        assert relative(g, w) < 2e-2
    assert calls == [1]  # one call for both rows and all their sequences


# --- sliding windows ------------------------------------------------------------------------

WINDOW = 4  # shorter than every sequence of LENGTHS: each one's window binds


def windowed_separately(module, q, k, v, window, **kwargs):
    """Each sequence alone through transformers' sdpa with transformers' own sliding-window
    mask (`sliding_window_causal_mask_function`): `[R, L, heads, d]`."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    rows = []
    for row, lengths in enumerate(LENGTHS):
        pieces, start = [], 0
        for n in lengths:
            piece = slice(start, start + n)
            mask = sdpa_mask(batch_size=1, q_length=n, kv_length=n, allow_is_causal_skip=False,
                             mask_function=sliding_window_causal_mask_function(window))
            pieces.append(sdpa_attention_forward(module, q[row:row + 1, :, piece],
                                                 k[row:row + 1, :, piece],
                                                 v[row:row + 1, :, piece], mask, **kwargs)[0])
            start += n
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows)


def test_a_sliding_window_is_kept_per_sequence():
    """A windowed layer (`sliding_window=` from transformers) on the per-sequence path: each
    sequence attends within the window as transformers' mask defines it (query i sees keys
    i − w < j ≤ i), gradients included; without the window it would be far off."""
    module, q, k, v, position_ids = packed_inputs("cpu", torch.float32)
    got, _ = packed_sdpa(module, q, k, v, None, position_ids=position_ids,
                         sliding_window=WINDOW)
    want = windowed_separately(module, q, k, v, WINDOW)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert relative(separately(module, q, k, v), want) > 0.1


def flash_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size):
    """What `varlen_attn` computes with flash's `window_size=(left, right)` (key j kept for query
    i iff i − left ≤ j ≤ i + right, −1 unbounded), sequence by sequence in plain SDPA."""
    left, right = window_size
    out = []
    for start, end in zip(cu_q.tolist(), cu_q[1:].tolist()):
        q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
        steps = torch.arange(end - start)
        distance = steps[:, None] - steps[None, :]
        keep = torch.ones_like(distance, dtype=torch.bool)
        if left >= 0:
            keep &= distance <= left
        if right >= 0:
            keep &= -distance <= right
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, scale=scale)[0].transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("window", [None, WINDOW])
def test_the_varlen_call_takes_the_window(monkeypatch, window):
    """The varlen path passes a windowed layer's window as flash's `window_size=(w − 1, 0)`
    (plain causal: `(−1, 0)`), which keeps exactly transformers' window. On CPU, by call layout
    only, with a plain-SDPA stand-in that reads `window_size` as the flash kernel does."""
    sizes = []
    monkeypatch.setattr(packed_attention, "_VARLEN", lambda *a, window_size, **kw: sizes.append(
        window_size) or flash_varlen(*a, window_size=window_size, **kw))
    monkeypatch.setattr(packed_attention, "_CAUSAL", "window_size")
    monkeypatch.setattr(packed_attention, "_varlen_dtype", lambda *a: torch.float32)
    module, q, k, v, position_ids = packed_inputs("cpu", torch.float32)
    got, _ = packed_sdpa(module, q, k, v, None, position_ids=position_ids, scaling=0.3,
                         sliding_window=window)
    want = (separately(module, q, k, v, scaling=0.3) if window is None
            else windowed_separately(module, q, k, v, window, scaling=0.3))
    assert sizes == [(-1, 0) if window is None else (window - 1, 0)]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_window_needs_a_varlen_that_takes_one(monkeypatch):
    """torch versions whose varlen call has only `is_causal` cannot window: the per-sequence
    path serves windowed layers there."""
    calls = []
    monkeypatch.setattr(packed_attention, "_VARLEN", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(packed_attention, "_CAUSAL", "is_causal")
    monkeypatch.setattr(packed_attention, "_flash_runs", lambda *a: True)
    module, q, k, v, position_ids = packed_inputs("cpu", torch.bfloat16)
    got, _ = packed_sdpa(module, q, k, v, None, position_ids=position_ids,
                         sliding_window=WINDOW)
    assert calls == []
    want = windowed_separately(module, q, k, v, WINDOW)
    assert relative(got, want) < 1e-2


# --- where the varlen call runs -------------------------------------------------------------

@pytest.mark.parametrize("capability,dim,varlen", [
    ((7, 0), 16, False),  # V100
    ((7, 5), 16, False),  # T4
    ((8, 0), 16, True),  # A100
    ((9, 0), 16, True),  # H100
    ((8, 0), 12, False),  # not a multiple of 8
    ((8, 0), 264, False),  # over 256
])
def test_varlen_only_where_the_flash_kernel_runs(monkeypatch, capability, dim, varlen):
    """The flash kernel refuses pre-Ampere cards and some head sizes at the first step: those
    take the per-sequence path. Faked on CPU: the device counts as CUDA device 0 of the given
    capability, which is read once per device however many layers call."""
    asked = []
    monkeypatch.setattr(packed_attention, "_cuda_index", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda index: asked.append(index) or capability)
    packed_attention._ampere_or_newer.cache_clear()
    calls = []
    monkeypatch.setattr(packed_attention, "_VARLEN",
                        lambda *a, **kw: calls.append(1) or reference_varlen(*a, **kw))
    module, q, k, v, position_ids = packed_inputs("cpu", torch.bfloat16, dim=dim)
    for _ in range(3):  # three layers
        got, _ = packed_sdpa(module, q, k, v, None, position_ids=position_ids)
    packed_attention._ampere_or_newer.cache_clear()
    assert len(calls) == (3 if varlen else 0)
    assert asked == ([0] if dim in (16,) else [])
    assert relative(got, separately(module, q, k, v)) < 1e-2
