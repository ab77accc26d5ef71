"""The concatenated forward: one model call over `[chosen; rejected]`, halves lined up by pair."""
import pytest
import torch

from dpo.forward import causal_attention_mask, concatenated_forward
from dpo.logprobs import IGNORE_INDEX, sequence_logps
from dpo.tiny import tiny_qwen3

VOCAB = 50


def _pair_batch():
    """Two pairs, right-padded to T = 10. Prompts of 3 and 4 tokens; responses of varying length
    so that padding differs per row. Rows 0-1 chosen, rows 2-3 rejected."""
    g = torch.Generator().manual_seed(1)
    lengths = [(3, 5), (4, 6), (3, 7), (4, 3)]  # (prompt, response) per row
    input_ids = torch.zeros(4, 10, dtype=torch.long)
    attention_mask = torch.zeros(4, 10, dtype=torch.long)
    labels = torch.full((4, 10), IGNORE_INDEX)
    for row, (p, r) in enumerate(lengths):
        input_ids[row, :p + r] = torch.randint(1, VOCAB, (p + r,), generator=g)
        attention_mask[row, :p + r] = 1
        labels[row, p:p + r] = input_ids[row, p:p + r]
    input_ids[2:, :4] = input_ids[:2, :4]  # same prompt for both halves of a pair
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("chunked", [False, True])
def test_halves_line_up_with_separate_calls(chunked):
    """Pair i's chosen result equals a separate model call on row i, its rejected result a call
    on row B+i; each row is run alone, without padding, so padding must not leak in."""
    model = tiny_qwen3(VOCAB).eval()
    batch = _pair_batch()
    with torch.no_grad():
        out = concatenated_forward(model, batch, chunked=chunked, chunk_size=4)
        alone = []
        for row in range(4):
            n = int(batch["attention_mask"][row].sum())
            logits = model(batch["input_ids"][row:row + 1, :n]).logits
            alone.append(sequence_logps(logits, batch["labels"][row:row + 1, :n])[0])
    alone = torch.cat(alone)
    torch.testing.assert_close(out.chosen_logps, alone[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps, alone[2:], rtol=1e-5, atol=1e-5)
    assert out.chosen_lengths.tolist() == [5, 6] and out.rejected_lengths.tolist() == [7, 3]


def test_chunked_and_plain_agree_including_logit_means():
    model = tiny_qwen3(VOCAB).eval()
    batch = _pair_batch()
    with torch.no_grad():
        plain = concatenated_forward(model, batch, chunked=False)
        chunked = concatenated_forward(model, batch, chunked=True, chunk_size=3)
    for field in ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean"):
        torch.testing.assert_close(getattr(chunked, field), getattr(plain, field),
                                   rtol=1e-5, atol=1e-6, msg=field)


@pytest.mark.parametrize("chunked", [False, True])
def test_one_model_call_for_both_halves(chunked):
    model = tiny_qwen3(VOCAB)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    concatenated_forward(model, _pair_batch(), chunked=chunked)
    assert len(calls) == 1


def test_odd_batch_is_rejected():
    batch = {k: v[:3] for k, v in _pair_batch().items()}
    with pytest.raises(ValueError, match="even number of rows"):
        concatenated_forward(tiny_qwen3(VOCAB), batch)


def test_mask_is_dropped_only_for_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    holey = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]])
    assert causal_attention_mask(right) is None
    assert causal_attention_mask(torch.ones(2, 4, dtype=torch.long)) is None
    assert causal_attention_mask(left) is left and causal_attention_mask(holey) is holey


@pytest.mark.parametrize("chunked", [False, True])
def test_left_padded_batch_keeps_its_mask_and_its_values(chunked):
    """A left-padded batch (not what our collator makes) must still be right: its mask reaches
    the model, and log-probs and gradients equal those of the right-padded batch."""
    model = tiny_qwen3(VOCAB)
    right = _pair_batch()
    left = {k: torch.stack([row.roll(int((1 - m).sum())) for row, m in
                            zip(v, right["attention_mask"])]) for k, v in right.items()}
    assert left["attention_mask"][:, 0].eq(0).any()
    seen = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    results = []
    for batch in (right, left):
        model.zero_grad()
        out = concatenated_forward(model, batch, chunked=chunked, chunk_size=4)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
        results.append((out, model.lm_head.weight.grad.clone()))
    assert seen[0] is None and seen[1] is left["attention_mask"]
    (want, want_grad), (got, got_grad) = results
    # RoPE sees relative positions only: shifting a row leaves its attention unchanged.
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected_logps, want.rejected_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)
