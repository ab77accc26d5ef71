"""Summed response log-probs: the plain path, and the chunked path that never builds the logits."""
import math

import pytest
import torch
import torch.nn.functional as F

from dpo.model.logprobs import IGNORE_INDEX, LogitsTransform, chunked_sequence_logps, sequence_logps
from dpo.demo.tiny import tiny_qwen3
from tests.conftest import QWEN3_VOCAB


def test_uniform_logits_by_hand():
    """All-zero logits over V = 4 give every token log(1/4). Row 0 has response labels at
    positions 2 and 3 (predicted from positions 1 and 2): 2·log(1/4) = −2.7725887.
    Row 1 has one response label: −1.3862944."""
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, -100, -100, 2]])
    logps, counts = sequence_logps(logits, labels)
    torch.testing.assert_close(logps, torch.tensor([2 * math.log(0.25), math.log(0.25)]))
    assert counts.tolist() == [2, 1]


def test_label_shift_by_hand():
    """The logits at position t score the label at t+1: with V = 2 and logits (0, ln 3) at
    position 0, p(token 1) = 3/4, so a label 1 at position 1 scores log(3/4) = −0.2876821; the
    logits at the last position predict nothing and are never read."""
    logits = torch.tensor([[[0.0, math.log(3)], [100.0, -100.0]]])
    logps, counts = sequence_logps(logits, torch.tensor([[-100, 1]]))
    torch.testing.assert_close(logps, torch.tensor([math.log(0.75)]))
    assert counts.tolist() == [1]


def test_matches_cross_entropy():
    """Σ log π over the response tokens = −Σ cross_entropy over the same (shifted) tokens."""
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 11)
    labels = torch.randint(0, 11, (3, 9))
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[1, 7:] = IGNORE_INDEX  # padding
    logps, counts = sequence_logps(logits, labels)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    torch.testing.assert_close(logps, -ce.sum(-1))
    assert counts.tolist() == [5, 3, 5]


def test_bf16_logits_are_summed_in_fp32():
    logits = torch.randn(2, 5, 7).bfloat16()
    labels = torch.randint(0, 7, (2, 5))
    logps, _ = sequence_logps(logits, labels)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, sequence_logps(logits.float(), labels)[0])


def _batch(vocab_size, batch=4, seq=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[:, :seq // 3] = IGNORE_INDEX  # prompt
    labels[1, seq - 7:] = IGNORE_INDEX  # padding at the end of one row
    return input_ids, labels


def _plain_and_chunked(model, input_ids, labels, chunk_size, transform=None):
    """(logps, counts, logit sums, grads) of both paths for the same model and batch, the plain
    one on the `transform`ed logits; loss = Σ logps·w with distinct weights per row so that a row
    mix-up would show in the gradients."""
    weights = torch.arange(1.0, input_ids.shape[0] + 1)
    results = []
    for chunked in (False, True):
        model.zero_grad()
        out = model(input_ids, output_hidden_states=True)
        if chunked:
            logps, counts, sums = chunked_sequence_logps(
                out.hidden_states[-1], model.get_output_embeddings(), labels,
                chunk_size=chunk_size, logits_transform=transform)
        else:
            logits = out.logits if transform is None else transform(out.logits)
            logps, counts = sequence_logps(logits, labels)
            mask = (labels[:, 1:] != IGNORE_INDEX).unsqueeze(-1)
            sums = (logits[:, :-1].detach() * mask).sum((1, 2))
        (logps * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logps.detach(), counts, sums, grads))
    return results


@pytest.mark.parametrize("vocab_size, chunk_size", [(97, 7), (QWEN3_VOCAB, 50)])
def test_chunked_matches_plain_values_and_gradients(vocab_size, chunk_size):
    """Same log-probs and same gradient in every parameter, to 1e-5 relative, also at Qwen3's
    vocabulary size. Chunk sizes do not divide the token count, so a partial last chunk runs."""
    model = tiny_qwen3(vocab_size, hidden_size=32)
    input_ids, labels = _batch(vocab_size)
    (plain, n_plain, _, g_plain), (chunked, n_chunked, _, g_chunked) = _plain_and_chunked(
        model, input_ids, labels, chunk_size)
    assert torch.equal(n_plain, n_chunked)
    assert (labels[:, 1:] != IGNORE_INDEX).sum() % chunk_size != 0
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)
    for name, g in g_plain.items():
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(g_chunked[name] / scale, g / scale, rtol=1e-5, atol=1e-5,
                                   msg=f"gradient of {name}")


def test_chunked_logits_sums_match_the_logits():
    """The `logits/*` metrics need Σ logits over response tokens and vocabulary."""
    model = tiny_qwen3(31)
    input_ids, labels = _batch(31)
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
        _, _, sums = chunked_sequence_logps(out.hidden_states[-1], model.lm_head, labels,
                                            chunk_size=5)
    mask = (labels[:, 1:] != IGNORE_INDEX).unsqueeze(-1)
    torch.testing.assert_close(sums, (out.logits[:, :-1] * mask).sum((1, 2)))


def test_chunked_with_no_response_tokens():
    """A batch whose labels are all ignored yields zeros, not an error."""
    model = tiny_qwen3(13)
    hidden = torch.randn(2, 6, 64)
    labels = torch.full((2, 6), IGNORE_INDEX)
    logps, counts, sums = chunked_sequence_logps(hidden, model.lm_head, labels)
    assert logps.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0] and sums.tolist() == [0, 0]


def test_token_logps_backward_is_exact():
    """The hand-written backward of the chunk's log-softmax-and-gather against autograd's
    numerical differentiation, in float64 (targets repeat within the chunk on purpose)."""
    from dpo.model.logprobs import _TokenLogps

    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])

    def token_logps(x):
        return _TokenLogps.apply(x, targets, torch.logsumexp(x.detach(), -1))

    assert torch.autograd.gradcheck(token_logps, (logits,))
    want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(token_logps(logits), want)


def test_logits_transform_is_read_off_the_config():
    from transformers import (CohereConfig, Gemma2Config, Gemma3TextConfig, GraniteConfig,
                              Qwen3Config)

    assert LogitsTransform.from_config(Qwen3Config()) is None
    assert LogitsTransform.from_config(Gemma3TextConfig()) is None  # no soft-capping by default
    assert LogitsTransform.from_config(GraniteConfig()) is None  # scaling 1
    assert LogitsTransform.from_config(Gemma2Config()) == LogitsTransform(softcap=30.0)
    assert LogitsTransform.from_config(CohereConfig()) == LogitsTransform(multiply=0.0625)
    assert LogitsTransform.from_config(GraniteConfig(logits_scaling=8)) == LogitsTransform(
        divide=8.0)


@pytest.mark.parametrize("transform", [LogitsTransform(softcap=5.0),
                                       LogitsTransform(multiply=0.25),
                                       LogitsTransform(divide=3.0, softcap=4.0)], ids=repr)
def test_chunked_applies_the_logits_transform(transform):
    """Chunked with a transform = plain on the transformed logits: log-probs, logit sums, and
    every gradient (the transform's own backward ahead of the lean one of the log-softmax)."""
    model = tiny_qwen3(97, hidden_size=32)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits of several units, where the capping bites
    input_ids, labels = _batch(97)
    (plain, _, plain_sums, g_plain), (chunked, _, chunked_sums, g_chunked) = _plain_and_chunked(
        model, input_ids, labels, chunk_size=7, transform=transform)
    with torch.no_grad():
        bare = sequence_logps(model(input_ids).logits, labels)[0]
    assert ((bare - plain).abs() / plain.abs()).min() > 1e-2  # the transform matters here
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)
    torch.testing.assert_close(chunked_sums, plain_sums, rtol=1e-5, atol=1e-4)
    for name, g in g_plain.items():
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(g_chunked[name] / scale, g / scale, rtol=1e-5, atol=1e-5,
                                   msg=f"gradient of {name}")


# --- WPO's and LD-DPO's sums, in the same pass -----------------------------------------------

def test_wpo_sums_by_hand():
    """V = 2, logits (0, ln 3) at position 0: π = (1/4, 3/4), Σ_v π(v)² = 1/16 + 9/16 = 5/8,
    so a label 1 scores log(3/4) − log(5/8) = log 1.2 = 0.18232156 and a label 0
    log(1/4) − log(5/8) = log 0.4 = −0.91629073. Same on both paths."""
    from dpo.model.logprobs import chunked_response_sums, response_sums

    logits = torch.tensor([[[0.0, math.log(3)], [100.0, -100.0]]]).repeat(2, 1, 1)
    labels = torch.tensor([[-100, 1], [-100, 0]])
    want = torch.tensor([math.log(1.2), math.log(0.4)])
    torch.testing.assert_close(response_sums(logits, labels, weighting=True).wpo_sums, want)
    head = torch.nn.Linear(2, 2, bias=True)  # hidden (1, 0) ↦ logits = the bias
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, math.log(3)]))
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(2, 2, 2)
    torch.testing.assert_close(
        chunked_response_sums(hidden, head, labels, weighting=True).wpo_sums, want)


def _extras(model, input_ids, labels, excess, chunked, chunk_size=5):
    """(logps, excess_logps, wpo_sums, grads of Σ excess_logps·w) of one path."""
    from dpo.model.logprobs import chunked_response_sums, response_sums

    model.zero_grad()
    out = model(input_ids, output_hidden_states=True)
    if chunked:
        sums = chunked_response_sums(out.hidden_states[-1], model.lm_head, labels,
                                     chunk_size=chunk_size, excess=excess, weighting=True)
    else:
        sums = response_sums(out.logits, labels, excess=excess, weighting=True)
    (sums.excess_logps * torch.arange(1.0, labels.shape[0] + 1)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return sums.logps.detach(), sums.excess_logps.detach(), sums.wpo_sums, grads


def test_chunked_excess_and_wpo_sums_match_the_full_logits():
    """LD-DPO's excess sums (values and gradients) and WPO's sums agree on both paths, and
    equal what the per-token log-probs of the full logits give by a direct sum."""
    model = tiny_qwen3(97, hidden_size=32)
    input_ids, labels = _batch(97)
    excess = torch.zeros_like(labels, dtype=torch.bool)
    excess[:, 30:] = True  # includes prompt-free padding of row 1: masked out by the labels
    full = _extras(model, input_ids, labels, excess, chunked=False)
    chunked = _extras(model, input_ids, labels, excess, chunked=True)
    for got, want in zip(chunked[:3], full[:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g in full[3].items():
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(chunked[3][name] / scale, g / scale, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids).logits[:, :-1].float(), -1)
        token = logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        square = torch.logsumexp(2 * logp, -1)  # log Σ_v π(v)², from the probabilities
        counted = labels[:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(full[1], (token * (counted & excess[:, 1:])).sum(-1))
    torch.testing.assert_close(full[2], ((token - square) * counted).sum(-1), rtol=1e-5, atol=1e-5)
    assert (full[1] != 0).all() and (full[1] != full[0]).all()


@pytest.mark.parametrize("weighting", [False, True])
def test_wpo_logsumexp_runs_in_the_same_pass_and_only_when_asked(monkeypatch, weighting):
    """Per chunk the forward takes logsumexp(z) once, and logsumexp(2·z) once more only with
    weighting; the backward's recomputation of each chunk takes neither."""
    from dpo.model import logprobs
    from dpo.model.logprobs import chunked_response_sums

    model = tiny_qwen3(31)
    input_ids, labels = _batch(31)
    hidden = model(input_ids, output_hidden_states=True).hidden_states[-1]
    calls = []
    real = torch.logsumexp
    monkeypatch.setattr(logprobs.torch, "logsumexp",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    sums = chunked_response_sums(hidden, model.lm_head, labels, chunk_size=9, weighting=weighting)
    chunks = math.ceil(int((labels[:, 1:] != IGNORE_INDEX).sum()) / 9)
    assert len(calls) == chunks * (2 if weighting else 1)
    sums.logps.sum().backward()
    assert len(calls) == chunks * (2 if weighting else 1)
    assert (sums.wpo_sums is not None) == weighting
