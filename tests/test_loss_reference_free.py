"""ORPO (`dpo.loss.reference_free.orpo`) on numbers small enough to check by hand, its stable
log(1 − e^a), and which settings it is refused with. (SimPO's and sft's hand-computed tests are
in tests/test_loss.py; ORPO against TRL 1.16 in tests/test_loss_trl.py.)

Two pairs, β = λ = 0.5, chosen lengths 2 and 1, rejected lengths 3 and 4:

    pair  log π(y⁺)  ā⁺     P⁺ = e^ā⁺  odds⁺   log π(y⁻)  ā⁻     P⁻    odds⁻  log odds ratio
     1     −2·ln 2   −ln 2    1/2       1       −3·ln 3   −ln 3   1/3    1/2        ln 2
     2       −1       −1       —        —         −4       −1      —      —           0

odds = P/(1 − P). The NLL is the batch's token mean, (2·ln 2 + 1)/3, pair i's share −log π(y⁺_i)·B/N
with B = 2 pairs and N = 3 chosen tokens: [4·ln 2/3, 2/3]. The odds-ratio term −log σ(x):
−log σ(ln 2) = −log(2/3) = ln 1.5 and −log σ(0) = ln 2.
"""
import math

import pytest
import torch

from dpo.config import ConfigError, TrainConfig
from dpo.loss import dpo_loss
from dpo.loss.reference_free import log1mexp, log_odds_ratio

BETA = 0.5
PI_C = torch.tensor([-2 * math.log(2), -1.0])
PI_R = torch.tensor([-3 * math.log(3), -4.0])
LENGTHS = dict(chosen_lengths=torch.tensor([2.0, 1.0]), rejected_lengths=torch.tensor([3.0, 4.0]))


def orpo(pi_c=PI_C, pi_r=PI_R, **kw):
    return dpo_loss(pi_c, pi_r, None, None, beta=BETA, loss_type="orpo", **{**LENGTHS, **kw})


def test_orpo_hand_computed():
    """L = NLL share + λ·(−log σ(log odds ratio)):
    pair 1: 4·ln 2/3 + 0.5·ln 1.5 = 0.92419624 + 0.20273255 = 1.12692879;
    pair 2: 2/3 + 0.5·ln 2 = 0.66666667 + 0.34657359 = 1.01324026.
    Rewards β·ā (TRL's ORPO rewards): chosen [−0.5·ln 2, −0.5], rejected [−0.5·ln 3, −0.5]."""
    losses, chosen_r, rejected_r = orpo()
    torch.testing.assert_close(losses, torch.tensor([1.12692879, 1.01324026]))
    torch.testing.assert_close(chosen_r, torch.tensor([-0.5 * math.log(2), -0.5]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.5 * math.log(3), -0.5]))
    means = PI_C / LENGTHS["chosen_lengths"], PI_R / LENGTHS["rejected_lengths"]
    torch.testing.assert_close(log_odds_ratio(*means), torch.tensor([math.log(2), 0.0]))


def test_orpo_nll_is_sfts_token_mean_and_reads_the_given_token_count():
    """The NLL part is `sft`'s term exactly, with the step's `num_tokens` when given: at 6 tokens
    per micro-batch, pair 1's share is 2·ln 2·2/6, pair 2's 1·2/6."""
    _, _, _, terms = dpo_loss(PI_C, PI_R, None, None, beta=BETA, loss_type="orpo", num_tokens=6.0,
                              return_terms=True, **LENGTHS)
    nll = torch.tensor([2 * math.log(2) * 2 / 6, 2 / 6])
    torch.testing.assert_close(terms["orpo"], nll + BETA * torch.tensor([math.log(1.5),
                                                                       math.log(2)]))
    sft, _, _ = dpo_loss(PI_C, PI_R, None, None, beta=BETA, loss_type="sft", num_tokens=6.0,
                         **LENGTHS)
    torch.testing.assert_close(sft, nll)


def test_orpo_ignores_the_reference():
    without, _, _ = orpo()
    with_ref, _, _ = dpo_loss(PI_C, PI_R, PI_C * 3, PI_R - 1, beta=BETA, loss_type="orpo",
                              **LENGTHS)
    torch.testing.assert_close(without, with_ref)


@pytest.mark.parametrize("a", [-1e-40, -1e-30, -1e-9, -1e-4, -0.5, -math.log(2), -0.7, -5.0,
                               -30.0, -200.0])
def test_log1mexp_by_hand_in_float64(a):
    """log(1 − e^a) in float32 against float64's log1p(−e^a) where that has no cancellation, and
    against log(−a) (first order) near 0; the gradient, −e^a/(1 − e^a), likewise."""
    x = torch.tensor([a], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    want = math.log(-a) if a > -1e-6 else math.log1p(-math.exp(a))
    grad = 1 / a if a > -1e-6 else -math.exp(a) / (1 - math.exp(a))
    if a > -torch.finfo(torch.float32).tiny:  # the clamp: log(tiny), no gradient
        want, grad = math.log(torch.finfo(torch.float32).tiny), 0.0
    assert y.item() == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert x.grad.item() == pytest.approx(grad, rel=1e-5)


def test_orpo_is_finite_where_an_average_log_prob_is_zero_or_nearly():
    """ā = 0 (every token certain, which float32 log-probs reach) and ā = −1e-9 (e^ā rounds to 1):
    the loss and its gradient stay finite, on the chosen side, the rejected side and both."""
    for pi_c, pi_r in [([0.0, -1e-9], [-3.0, -4.0]), ([-2.0, -1.0], [0.0, -4e-9]),
                       ([0.0, -1e-9], [0.0, -4e-9])]:
        pi_c = torch.tensor(pi_c, requires_grad=True)
        pi_r = torch.tensor(pi_r, requires_grad=True)
        losses, _, _ = orpo(pi_c, pi_r)
        losses.sum().backward()
        assert torch.isfinite(losses).all(), losses
        assert torch.isfinite(pi_c.grad).all() and torch.isfinite(pi_r.grad).all()


def _config(**options):
    return TrainConfig(model="tiny", dataset="none", **options)


@pytest.mark.parametrize("options, message", [
    (dict(loss_type=["orpo", "sft"]), "^loss_type orpo has the chosen responses' NLL"),
    (dict(loss_type=["orpo"], rpo_alpha=0.5), "^loss_type orpo has the chosen responses' NLL"),
    (dict(loss_type=["orpo"], ld_alpha=0.5), "^ld_alpha: loss_type orpo divides each log-prob"),
    (dict(loss_type=["orpo"], precompute_ref_logps=True), "^precompute_ref_logps: loss_type orpo "
                                                          "is reference-free"),
    (dict(loss_type=["orpo"], sync_ref_model=True), "^sync_ref_model: loss_type orpo uses no "
                                                    "reference"),
    (dict(loss_type=["orpo"], f_divergence_type="forward_kl"), "loss_type orpo reads no "
                                                               "reference model"),
])
def test_orpo_is_refused_with_one_line(options, message):
    with pytest.raises(ConfigError, match=message):
        _config(**options)


def test_orpo_beside_a_reference_loss_is_the_sum_and_loads_the_reference_for_it():
    """ORPO + DPO: the reference is read for DPO's term, and the rewards are DPO's log-ratios."""
    from dpo.loss import needs_reference

    assert not needs_reference(["orpo"]) and needs_reference(["orpo", "sigmoid"])
    assert _config(loss_type=["sigmoid", "orpo"]).loss_type == ["sigmoid", "orpo"]
    ref_c, ref_r = PI_C + 1, PI_R
    losses, chosen_r, _, terms = dpo_loss(PI_C, PI_R, ref_c, ref_r, beta=BETA,
                                          loss_type=["sigmoid", "orpo"], loss_weights=[1.0, 2.0],
                                          return_terms=True, **LENGTHS)
    torch.testing.assert_close(losses, terms["sigmoid"] + 2 * terms["orpo"])
    torch.testing.assert_close(terms["orpo"], orpo()[0])
    torch.testing.assert_close(chosen_r, torch.full((2,), -0.5))
