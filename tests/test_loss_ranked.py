"""Ranking losses (dpo/loss/ranked.py) by hand and by their properties.

One row of N = 3 responses, best first, β = 0.5, log-ratios lr = log π − log π_ref = (1, 0, −1),
so β·lr = (0.5, 0, −0.5):

Plackett–Luce, full ranking (stages 2):
    stage 1: log(e^0.5 + e^0 + e^−0.5) − 0.5 = log 3.2552519 − 0.5 = 0.6802697
    stage 2 (two left): −log σ(0 − (−0.5)) = −log σ(0.5)        = 0.4740770
    L = 1.1543467
Plackett–Luce, best over an unordered list (stages 1): stage 1 only, 0.6802697.
All pairs, full ranking: mean(−log σ(0.5), −log σ(1.0), −log σ(0.5))
    = (0.4740770 + 0.3132617 + 0.4740770) / 3 = 0.4204719
All pairs, stages 1: mean(−log σ(0.5), −log σ(1.0)) = 0.3936693
"""
import pytest
import torch

from dpo.loss import dpo_loss
from dpo.loss.ranked import all_pairs, plackett_luce, ranked_pairs, ranking_loss

BETA = 0.5
REF = torch.tensor([[-20.0, -21.0, -19.0]])
PI = REF + torch.tensor([[1.0, 0.0, -1.0]])
FULL = torch.tensor([[True, True, True]])


def test_plackett_luce_hand_computed():
    losses, rewards = ranking_loss(PI, REF, FULL, torch.tensor([2]), beta=BETA)
    torch.testing.assert_close(losses, torch.tensor([1.1543467]))
    torch.testing.assert_close(rewards, torch.tensor([[0.5, 0.0, -0.5]]))
    assert not rewards.requires_grad


def test_plackett_luce_one_stage_for_an_unordered_list():
    losses, _ = ranking_loss(PI, REF, FULL, torch.tensor([1]), beta=BETA)
    torch.testing.assert_close(losses, torch.tensor([0.6802697]))


def test_all_pairs_hand_computed():
    full = ranking_loss(PI, REF, FULL, torch.tensor([2]), beta=BETA, kind="all_pairs")[0]
    best = ranking_loss(PI, REF, FULL, torch.tensor([1]), beta=BETA, kind="all_pairs")[0]
    torch.testing.assert_close(full, torch.tensor([0.4204719]))
    torch.testing.assert_close(best, torch.tensor([0.3936693]))


@pytest.mark.parametrize("fn", [plackett_luce, all_pairs])
def test_two_responses_are_dpo_bit_for_bit(fn):
    """N = 2, alone or beside a third slot left empty: DPO's sigmoid loss to the last bit."""
    torch.manual_seed(0)
    pi, ref = torch.randn(5, 2) * 30, torch.randn(5, 2) * 30
    dpo = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta=0.1)[0]
    for stages in (torch.ones(5, dtype=torch.long), torch.full((5,), 7)):
        assert torch.equal(fn(pi, ref, torch.ones(5, 2, dtype=torch.bool), stages, 0.1), dpo)
        padded = [torch.cat([t, torch.zeros(5, 1)], 1) for t in (pi, ref)]
        mask = torch.tensor([[True, True, False]] * 5)
        assert torch.equal(fn(*padded, mask, stages, 0.1), dpo)


@pytest.mark.parametrize("fn", [plackett_luce, all_pairs])
def test_missing_slots_change_nothing_and_get_no_gradient(fn):
    """Row 0 ranks 3 responses, row 1 only 2: row 1's empty third slot, whatever it holds, is
    out of the loss, and neither its gradient nor the total's is NaN."""
    pi = torch.tensor([[-3.0, -4.0, -6.0], [-2.0, -5.0, 123.0]], requires_grad=True)
    ref = torch.tensor([[-3.5, -4.0, -5.0], [-2.5, -4.0, -7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    losses = fn(pi, ref, mask, torch.tensor([2, 1]), 0.5)
    pair = dpo_loss(pi[1:, 0], pi[1:, 1], ref[1:, 0], ref[1:, 1], beta=0.5)[0]
    assert torch.equal(losses[1:], pair)
    alone = fn(pi[:1], ref[:1], mask[:1], torch.tensor([2]), 0.5)
    torch.testing.assert_close(losses[:1], alone)
    losses.sum().backward()
    assert torch.isfinite(pi.grad).all() and pi.grad[1, 2] == 0


def test_plackett_luce_gradient_orders_the_responses():
    """A descent step raises the best response's log-prob and lowers the worst's."""
    pi = REF.clone().requires_grad_()
    plackett_luce(pi, REF, FULL, torch.tensor([2]), BETA).sum().backward()
    assert pi.grad[0, 0] < 0 < pi.grad[0, 2]


def test_plackett_luce_equals_its_definition_for_many_responses():
    """N = 5, stages 4, β = 1: Σ_k (logsumexp(lr_k..) − lr_k), with the last stage as a pair."""
    torch.manual_seed(1)
    pi, ref = torch.randn(1, 5), torch.randn(1, 5)
    lr = (pi - ref)[0]
    expected = sum(torch.logsumexp(lr[k:], 0) - lr[k] for k in range(4))
    got = plackett_luce(pi, ref, torch.ones(1, 5, dtype=torch.bool), torch.tensor([4]), 1.0)
    torch.testing.assert_close(got, expected.reshape(1))


def test_ranked_pairs_adjacent_or_against_the_best():
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    better, compared = ranked_pairs(mask, torch.tensor([2, 1]))
    assert compared.tolist() == [[False, True, True, False], [False, True, True, True]]
    assert better[0, 1:3].tolist() == [0, 1] and better[1, 1:].tolist() == [0, 0, 0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="ranking_loss must be one of"):
        ranking_loss(PI, REF, FULL, torch.tensor([2]), beta=BETA, kind="listmle")
    with pytest.raises(ValueError, match=r"must have the mask's shape \(1, 2\)"):
        ranking_loss(PI, REF, FULL[:, :2], torch.tensor([2]), beta=BETA)
