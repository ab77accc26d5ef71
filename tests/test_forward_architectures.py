"""The chunked head gives each architecture's own log-probs: a matrix of tiny random models of the
families transformers ships, with logits of realistic size, chunked against full logits."""
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from dpo.data.batching import PreferenceCollator
from dpo.model import packed_attention
from dpo.model.forward import concatenated_forward
from dpo.model.padding_probe import check_padding_free
from dpo.model.probes import check_chunked_head
from dpo.model.packed_attention import DENSE_MASK_ONLY, probe_length, use_dense_mask
from dpo.model.logprobs import IGNORE_INDEX, chunked_sequence_logps, sequence_logps
from tests.test_forward import logps_row_by_row

VOCAB = 1000
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Per-architecture config fields. The logit transforms are set to sizes that bite on logits of
# std ~6 (Gemma-3 has no soft-capping by default, Granite's default scaling is 1).
ARCHS = {
    "llama": {}, "mistral": {}, "gemma": {},
    "gemma2": {"final_logit_softcapping": 30.0},  # its default, pinned
    "gemma3_text": {"final_logit_softcapping": 30.0},
    "qwen2": {}, "qwen3": {}, "phi3": {}, "olmo2": {}, "gpt2": {}, "gpt_neox": {},
    "cohere": {"logit_scale": 0.0625},  # its default
    "granite": {"logits_scaling": 8.0},
    "falcon": {"head_dim": None, "new_decoder_architecture": True, "num_kv_heads": 2},
}
TRANSFORMED = {"gemma2", "gemma3_text", "cohere", "granite"}
LOGIT_STD = 6.0
# Sliding windows shorter than every sequence of `pair_batch` (19 to 40 tokens), as
# "<model type>/window": every layer windowed, or (/mixed) windowed and full layers alike.
WINDOW = 16
WINDOWED = {
    "mistral/window": {"sliding_window": WINDOW},
    "gemma2/mixed": {"sliding_window": WINDOW},  # layers alternate: windowed, full
    "gemma3_text/window": {"sliding_window": WINDOW},  # 2 layers of a 5:1 pattern: both windowed
    "gemma3_text/mixed": {"sliding_window": WINDOW,
                          "layer_types": ["sliding_attention", "full_attention"]},
    "qwen2/mixed": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "phi3/window": {"sliding_window": WINDOW},
}


def tiny_model(arch: str, dtype: torch.dtype = torch.float32):
    """A 2-layer random `arch` model whose logits have std ~LOGIT_STD, as a trained model's do
    (a random init's are ~0.2, where no soft-capping or scaling would show)."""
    model_type = arch.split("/")[0]
    fields = {**COMMON, **ARCHS[model_type], **WINDOWED.get(arch, {})}
    fields = {k: v for k, v in fields.items() if v is not None}
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    for module in model.modules():  # as dpo.model.loading does: no random masks between two calls
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    ids = torch.randint(3, VOCAB, (2, 32))
    with torch.no_grad():
        # Scaling the head (and, where tied, the embedding: the final norm undoes that) scales
        # the logits; Cohere's and Granite's own factors are part of what is measured.
        model.get_output_embeddings().weight.mul_(LOGIT_STD / model(ids).logits.std())
    return model.to(dtype)


def pair_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two pairs `[chosen; rejected]`, right-padded to 40 tokens, rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(6, 20), (9, 31), (6, 13), (9, 25)]  # (prompt, response) per row
    input_ids = torch.zeros(4, 40, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (p, r) in enumerate(lengths):
        input_ids[row, :p + r] = torch.randint(3, VOCAB, (p + r,), generator=g)
        attention_mask[row, :p + r] = 1
        labels[row, p:p + r] = input_ids[row, p:p + r]
    input_ids[2:, :9] = input_ids[:2, :9]  # a pair shares its prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def logps_and_grads(model, batch, chunked: bool):
    model.zero_grad()
    out = concatenated_forward(model, batch, chunked=chunked, chunk_size=7)
    # Distinct weights per row, so that a row mix-up shows in the gradients.
    (out.chosen_logps @ torch.tensor([1.0, 2.0])
     - out.rejected_logps @ torch.tensor([3.0, 4.0])).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("arch", list(ARCHS))
def test_chunked_equals_full_logits(arch):
    """Summed log-probs, the logit means and the gradient of every parameter (the LM head and
    the body alike), chunked against the model's own logits, to 1e-5 relative."""
    model = tiny_model(arch)
    batch = pair_batch()
    full, full_grads = logps_and_grads(model, batch, chunked=False)
    chunked, chunked_grads = logps_and_grads(model, batch, chunked=True)
    for field in ("chosen_logps", "rejected_logps", "chosen_logits_mean",
                  "rejected_logits_mean"):
        torch.testing.assert_close(getattr(chunked, field), getattr(full, field), rtol=1e-5,
                                   atol=1e-6, msg=f"{arch}: {field}")
    assert chunked_grads.keys() == full_grads.keys()
    head = model.get_output_embeddings().weight
    assert any(p is head for n, p in model.named_parameters() if n in full_grads)
    assert len(full_grads) > 5  # the body's weights too
    for name, g in full_grads.items():
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(chunked_grads[name] / scale, g / scale, rtol=1e-5, atol=1e-5,
                                   msg=f"{arch}: gradient of {name}")


@pytest.mark.parametrize("arch", sorted(TRANSFORMED))
def test_the_matrix_would_catch_a_missing_transform(arch):
    """The configs above make each transform matter: `lm_head` alone, the chunked head without
    the model's transform, is off by far more than the 1e-5 the matrix allows."""
    model = tiny_model(arch).eval()
    batch = pair_batch()
    with torch.no_grad():
        out = model(batch["input_ids"], output_hidden_states=True)
        want, _ = sequence_logps(out.logits, batch["labels"])
        bare, _, _ = chunked_sequence_logps(out.hidden_states[-1], model.get_output_embeddings(),
                                            batch["labels"], chunk_size=7)
    assert ((bare - want).abs() / want.abs()).min() > 1e-2


@pytest.mark.parametrize("arch", list(ARCHS))
def test_right_padded_rows_need_no_mask(arch):
    """`causal_attention_mask` drops the mask of a right-padded batch: each row's log-probs
    still equal those of the row run alone, unpadded, also for absolute-position models."""
    model = tiny_model(arch).eval()
    batch = pair_batch()
    with torch.no_grad():
        out = concatenated_forward(model, batch, chunked=True, chunk_size=7)
    alone = logps_row_by_row(model, batch)
    got = torch.cat([out.chosen_logps, out.rejected_logps])
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5, msg=arch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_passes_the_probe(arch, dtype):
    """No false alarm, in fp32 at its 1e-4 tolerance and in bf16 (rounded logits) at 1e-2; nor
    from the padding-free probe, whose tolerance is the model's own rounding noise (on
    packed_sdpa, which rounds differently from a padded batch; Gemma-2 eager, see
    `PACKED_CASES`)."""
    model = tiny_model(arch, dtype).train()
    assert check_chunked_head(model) is None
    assert model.training  # restored after the probe's eval-mode forward
    model.config._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    try:
        # max_length as a run's: the default windows (4096 for Mistral) are not probed here
        assert check_padding_free(model, chunked=True, max_length=64) is None
    finally:
        DENSE_MASK_ONLY.discard(type(model))  # Falcon's, which needs the dense mask


def assert_same_logps_and_grads(got: tuple, want: tuple, where: str) -> None:
    """`(PairLogps, gradients)` of two layouts of the same pairs equal: summed log-probs, logit
    means and lengths to 1e-5 relative, each parameter's gradient to 1e-5 of its largest entry."""
    (got, got_grads), (want, want_grads) = got, want
    for field in ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean",
                  "chosen_lengths", "rejected_lengths"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5,
                                   atol=1e-6, msg=f"{where}: {field}")
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 5
    for param, g in want_grads.items():
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(got_grads[param] / scale, g / scale, rtol=1e-5, atol=1e-5,
                                   msg=f"{where}: gradient of {param}")


def pair_rows(batch: dict[str, torch.Tensor]) -> list[dict]:
    """The tokenized pairs (as `dpo.data` gives them) of a padded `[chosen; rejected]` batch."""
    half = batch["labels"].shape[0] // 2
    rows = []
    for i in range(half):
        row = {}
        for side, r in (("chosen", i), ("rejected", half + i)):
            n = int(batch["attention_mask"][r].sum())
            row[f"{side}_input_ids"] = batch["input_ids"][r, :n].tolist()
            row[f"{side}_labels"] = batch["labels"][r, :n].tolist()
        rows.append(row)
    return rows


# sdpa refuses Gemma-2's attention soft-capping (transformers sends it to eager or flex).
PACKED_CASES = [(arch, impl) for arch in [*ARCHS, *WINDOWED] for impl in ("eager", "sdpa")
                if not (arch.startswith("gemma2") and impl == "sdpa")]
# The quick tier (not `slow`) packs a plain model, one with logit soft-capping, one windowed on
# every layer, one with windowed and full layers, and Falcon (the dense mask under sdpa).
QUICK_PACKED = {"llama", "gemma2", "mistral/window", "gemma3_text/mixed", "falcon"}


@pytest.mark.parametrize("arch,impl", [
    pytest.param(arch, impl, marks=() if arch in QUICK_PACKED else pytest.mark.slow)
    for arch, impl in PACKED_CASES])
def test_packed_equals_padded(arch, impl):
    """`--padding-free`: the same pairs packed in one row, and in three rows of at most 45
    tokens, give the padded batch's summed log-probs, logit means and gradients of every
    parameter to 1e-5 relative, on the chunked head and on the full logits; in this batch a
    sequence that saw its row's earlier sequences, or a label predicted across a boundary,
    would be off by far more. Under sdpa the packed rows run `packed_sdpa`, one causal call per
    sequence, except for a model the probe puts back on the dense block mask (Falcon). Windowed
    models (`WINDOWED`) keep their window on every sequence longer than it, on packed_sdpa
    (`sliding_window=`) as in transformers' mask."""
    model = tiny_model(arch)
    model.config._attn_implementation = impl
    # as train.py does first, with a run's max_length (default windows, 4096 for Mistral, are
    # not probed; WINDOWED's are)
    assert check_padding_free(model, chunked=True, max_length=64) is None
    if impl == "sdpa" and arch in WINDOWED:
        assert type(model) not in DENSE_MASK_ONLY  # the window is packed_sdpa's, not the mask's
    rows = pair_rows(pair_batch())
    padded = PreferenceCollator(0)(rows)
    layouts = {"one row": PreferenceCollator(0, padding_free=True)(rows),
               "rows of 45": PreferenceCollator(0, padding_free=True, max_packed_tokens=45)(rows)}
    assert layouts["one row"]["input_ids"].shape == (1, sum(padded["attention_mask"].sum(1)))
    assert layouts["rows of 45"]["input_ids"].shape[0] == 3
    for chunked in (True, False):
        want, want_grads = logps_and_grads(model, padded, chunked=chunked)
        for name, packed in layouts.items():
            got, got_grads = logps_and_grads(model, packed, chunked=chunked)
            assert_same_logps_and_grads((got, got_grads), (want, want_grads),
                                        f"{arch}/{impl}, {name}, chunked={chunked}")


def packed_and_padded_logps(model) -> tuple[torch.Tensor, torch.Tensor]:
    rows = pair_rows(pair_batch())
    with torch.no_grad():
        return tuple(torch.cat([out.chosen_logps, out.rejected_logps]) for out in (
            concatenated_forward(model.eval(), PreferenceCollator(0, padding_free=packed)(rows),
                                 chunked=True) for packed in (True, False)))


def test_the_dense_mask_keeps_the_window():
    """The fallback for a class the probe puts on transformers' sdpa (`use_dense_mask`): its
    block mask, built from the packed position ids, keeps the window too."""
    model = tiny_model("mistral/window")
    model.config._attn_implementation = "sdpa"
    try:
        use_dense_mask(model)
        packed, padded = packed_and_padded_logps(model)
    finally:
        DENSE_MASK_ONLY.discard(type(model))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    model.config.sliding_window = None  # the same model without its window differs
    assert ((packed_and_padded_logps(model)[1] - padded).abs() / padded.abs()).max() > 1e-4


@pytest.mark.parametrize("arch,dtype", [
    *((arch, dtype) for arch in ("mistral/window", "gemma3_text/mixed", "qwen2/mixed")
      for dtype in (torch.float32, torch.bfloat16)),
    ("phi3/window", torch.bfloat16)], ids=str)
def test_the_probe_catches_a_dropped_window(monkeypatch, arch, dtype):
    """A packed path that ignores the window (here packed_sdpa with its window mask taken
    away) is caught by the probe, whose long pair passes the window, unlike its short pairs,
    in bf16 as in fp32: the model goes back to transformers' sdpa, whose dense mask keeps the
    window."""
    model = tiny_model(arch, dtype)
    model.config.sliding_window = 48  # beyond the short pairs' 39 tokens
    model.config._attn_implementation = "sdpa"
    monkeypatch.setattr(packed_attention, "_window_mask", lambda *a: None, raising=False)
    DENSE_MASK_ONLY.discard(type(model))  # as no earlier probe left it
    try:
        assert check_padding_free(model, chunked=True) is None
        assert type(model) in DENSE_MASK_ONLY
        packed, padded = packed_and_padded_logps(model)
    finally:
        DENSE_MASK_ONLY.discard(type(model))
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(packed, padded, rtol=tolerance, atol=1e-6)


def test_the_probe_reaches_past_the_window_within_max_length():
    """The long probe pair: twice the window (at least 24 tokens past it), capped at the run's
    max_length; none where max_length never passes the window or there is none."""
    model = tiny_model("mistral/window")
    assert probe_length(model, None) == 16 + 24
    model.config.sliding_window = 48
    assert probe_length(model, None) == 96 and probe_length(model, 4096) == 96
    assert probe_length(model, 60) == 60 and probe_length(model, 48) is None
    assert probe_length(tiny_model("llama"), None) is None
