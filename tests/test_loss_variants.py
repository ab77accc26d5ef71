"""WPO's pair weights and LD-DPO's length-desensitised log-probs, on hand-computed numbers, and
how `dpo_loss` takes them; the combinations refused."""
import math

import pytest
import torch

from dpo.config import ConfigError, TrainConfig
from dpo.loss import check_loss_options, dpo_loss
from dpo.loss.variants import length_desensitised, wpo_weights

PI_C, PI_R = torch.tensor([-8.0, -5.0]), torch.tensor([-6.0, -7.5])
REF_C, REF_R = torch.tensor([-9.0, -5.5]), torch.tensor([-5.0, -7.0])
LENGTHS = dict(chosen_lengths=torch.tensor([5.0, 4.0]), rejected_lengths=torch.tensor([3.0, 4.0]))


def test_wpo_weight_hand_computed():
    """log w(y⁺) = −0.5, log w(y⁻) = −1.0: weight e^−1.5 = 0.22313016; log w(y⁺) = 0.75,
    log w(y⁻) = −0.25: e^0.5 = 1.6487 is clamped to 1; 0 and 0: exactly 1."""
    weights = wpo_weights(torch.tensor([-0.5, 0.75, 0.0]), torch.tensor([-1.0, -0.25, 0.0]))
    torch.testing.assert_close(weights, torch.tensor([0.22313016, 1.0, 1.0]))
    assert not weights.requires_grad


def test_wpo_weight_carries_no_gradient():
    log_w = torch.tensor([-0.5], requires_grad=True)
    assert not wpo_weights(log_w, log_w).requires_grad


def test_length_desensitised_hand_computed():
    """A chosen response of 5 tokens with log-probs −1, −2, −1, −3, −1 and a rejected one of 3:
    ℓ_p = 3, so the chosen's excess part is −3 − 1 = −4, and at α = 0.5 its log π̂ = −4 +
    0.5·(−4) = −6 (log π = −8); α = 0 keeps the first 3 tokens (−4); the rejected response has
    no excess (−6 stays −6)."""
    logps, excess = torch.tensor([-8.0, -6.0]), torch.tensor([-4.0, 0.0])
    torch.testing.assert_close(length_desensitised(logps, excess, 0.5), torch.tensor([-6.0, -6.0]))
    torch.testing.assert_close(length_desensitised(logps, excess, 0.0), torch.tensor([-4.0, -6.0]))


def test_ld_alpha_one_is_the_plain_log_prob_to_the_bit():
    logps = torch.randn(64, dtype=torch.float32) * 100
    excess = logps * torch.rand(64)
    assert torch.equal(length_desensitised(logps, excess, 1.0), logps)


def test_pair_weights_multiply_every_term_of_a_mixture():
    """sigmoid + 0.5·sft, times weights (0.25, 1): each pair's loss is its weight times the
    weighted sum of its unweighted terms, which are returned as they were."""
    kw = dict(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], **LENGTHS)
    plain, _, _, terms = dpo_loss(PI_C, PI_R, REF_C, REF_R, return_terms=True, **kw)
    weights = torch.tensor([0.25, 1.0])
    weighted, _, _, weighted_terms = dpo_loss(PI_C, PI_R, REF_C, REF_R, pair_weights=weights,
                                              return_terms=True, **kw)
    torch.testing.assert_close(weighted, weights * (terms["sigmoid"] + 0.5 * terms["sft"]))
    torch.testing.assert_close(weighted, weights * plain)
    for name in terms:
        assert torch.equal(weighted_terms[name], terms[name])


def test_weights_of_one_are_plain_dpo_exactly():
    plain, chosen, rejected = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1)
    weighted, chosen_w, rejected_w = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1,
                                              pair_weights=torch.ones(2))
    assert torch.equal(weighted, plain)
    assert torch.equal(chosen_w, chosen) and torch.equal(rejected_w, rejected)


def test_sft_reads_the_plain_chosen_log_probs_under_ld():
    """With LD-DPO's log-probs for the preference terms, sft still reads the whole chosen
    response: −(−8)·2/9 = 1.7777778 for pair 0 (2 pairs, 5 + 4 = 9 chosen tokens)."""
    ld_chosen = torch.tensor([-6.0, -5.0])
    _, _, _, terms = dpo_loss(ld_chosen, PI_R, REF_C, REF_R, beta=0.1,
                              loss_type=["sigmoid", "sft"], sft_chosen_logps=PI_C,
                              return_terms=True, **LENGTHS)
    torch.testing.assert_close(terms["sft"], torch.tensor([8.0 * 2 / 9, 5.0 * 2 / 9]))
    want = -torch.nn.functional.logsigmoid(0.1 * ((ld_chosen - REF_C) - (PI_R - REF_R)))
    torch.testing.assert_close(terms["sigmoid"], want)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_weighting_is_refused_with_the_sorting_losses(loss_type):
    with pytest.raises(ValueError, match="use_weighting: loss_type .* sorts the margins"):
        check_loss_options(beta=0.1, loss_type=[loss_type], use_weighting=True)
    with pytest.raises(ValueError, match="sorts the margins"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type=loss_type,
                 pair_weights=torch.ones(2))
    with pytest.raises(ConfigError, match="^use_weighting: loss_type"):
        TrainConfig(model="tiny", dataset="none", loss_type=["sigmoid", loss_type],
                    use_weighting=True)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan])
def test_ld_alpha_outside_zero_one_is_refused(alpha):
    with pytest.raises(ConfigError, match=r"^ld_alpha must lie in \[0, 1\]"):
        TrainConfig(model="tiny", dataset="none", ld_alpha=alpha)


@pytest.mark.parametrize("loss_type", [["ipo"], ["sigmoid_norm"], ["simpo"], ["sigmoid", "ipo"]])
def test_ld_alpha_is_refused_with_the_length_normalised_losses(loss_type):
    with pytest.raises(ConfigError, match="^ld_alpha: loss_type .*divides each log-prob"):
        TrainConfig(model="tiny", dataset="none", loss_type=loss_type, ld_alpha=0.5)


def test_ld_alpha_is_refused_with_sft_alone_and_allowed_beside_it():
    with pytest.raises(ConfigError, match="^ld_alpha: loss_type sft has no preference term"):
        TrainConfig(model="tiny", dataset="none", loss_type=["sft"], ld_alpha=0.5)
    cfg = TrainConfig(model="tiny", dataset="none", ld_alpha=0.5, rpo_alpha=0.2)
    assert cfg.loss_type == ["sigmoid", "sft"]


def test_both_flags_are_off_by_default():
    cfg = TrainConfig(model="tiny", dataset="none")
    assert cfg.use_weighting is False and cfg.ld_alpha is None
