"""The DPO loss family on numbers small enough to check by hand.

Three pairs are used throughout, with β = 0.5 (summed log-probs, π = policy, ref = reference):

    pair   log π(y⁺)  log π(y⁻)  log ref(y⁺)  log ref(y⁻)   Δ = (π⁺ − ref⁺) − (π⁻ − ref⁻)   βΔ
     1       −10        −12         −11          −11          (+1) − (−1) = +2              +1
     2        −5         −5          −5           −5            0  −   0  =  0               0
     3       −12        −10         −11          −11          (−1) − (+1) = −2              −1

Write sp(x) = −log σ(x) = log(1 + e^−x): sp(1) = 0.31326169, sp(0) = ln 2 = 0.69314718,
sp(−1) = 1.31326169. Note sp(−x) = sp(x) + x.
"""
import math

import pytest
import torch

from dpo.loss import LOSSES, dpo_loss

# The losses of pairs; KTO's unpaired rows are tested in tests/test_loss_unpaired.py.
LOSS_TYPES = tuple(t for t in LOSSES if not LOSSES[t].unpaired)

BETA = 0.5
PI_C = torch.tensor([-10.0, -5.0, -12.0])
PI_R = torch.tensor([-12.0, -5.0, -10.0])
REF_C = torch.tensor([-11.0, -5.0, -11.0])
REF_R = torch.tensor([-11.0, -5.0, -11.0])
LEN_C = torch.tensor([2.0, 5.0, 4.0])
LEN_R = torch.tensor([4.0, 5.0, 2.0])


def loss_of(loss_type, *, pi_c=PI_C, pi_r=PI_R, ref_c=REF_C, ref_r=REF_R, beta=BETA, **kw):
    if any(LOSSES[t].lengths for t in ([loss_type] if isinstance(loss_type, str) else loss_type)):
        kw = {"chosen_lengths": LEN_C, "rejected_lengths": LEN_R, **kw}
    return dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type=loss_type, **kw)


def test_sigmoid_hand_computed():
    """L = sp(βΔ) = [sp(1), sp(0), sp(−1)] = [0.31326169, 0.69314718, 1.31326169].
    Rewards β·(π − ref): chosen [0.5, 0, −0.5], rejected [−0.5, 0, 0.5]."""
    losses, chosen_r, rejected_r = loss_of("sigmoid")
    torch.testing.assert_close(losses, torch.tensor([0.31326169, 0.69314718, 1.31326169]))
    torch.testing.assert_close(chosen_r, torch.tensor([0.5, 0.0, -0.5]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.5, 0.0, 0.5]))


def test_conservative_dpo_hand_computed():
    """cDPO, ε = 0.1: (1−ε)·sp(x) + ε·sp(−x) = sp(x) + ε·x with x = βΔ = [1, 0, −1]:
    [0.31326169 + 0.1, 0.69314718, 1.31326169 − 0.1] = [0.41326169, 0.69314718, 1.21326169]."""
    losses, _, _ = loss_of("sigmoid", label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.41326169, 0.69314718, 1.21326169]))


def test_robust_hand_computed():
    """Robust DPO, ε = 0.1: [(1−ε)·sp(x) − ε·sp(−x)] / (1−2ε) = sp(x) − ε·x/(1−2ε)
    = sp(x) − 0.125·x: [0.18826169, 0.69314718, 1.43826169]."""
    losses, _, _ = loss_of("robust", label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.18826169, 0.69314718, 1.43826169]))


def test_hinge_hand_computed():
    """max(0, 1 − βΔ) = [max(0, 0), 1, 2]: pair 1 already has margin 1, so it costs nothing."""
    losses, _, _ = loss_of("hinge")
    torch.testing.assert_close(losses, torch.tensor([0.0, 1.0, 2.0]))


def test_ipo_hand_computed():
    """Lengths |y⁺| = [2, 5, 4], |y⁻| = [4, 5, 2]; per-token Δ̄ = (π⁺−ref⁺)/|y⁺| − (π⁻−ref⁻)/|y⁻|:
    pair 1: 1/2 + 1/4 = 0.75; pair 2: 0; pair 3: −1/4 − 1/2 = −0.75. Target 1/(2β) = 1:
    L = (Δ̄ − 1)² = [0.0625, 1, 3.0625]."""
    losses, chosen_r, _ = loss_of("ipo")
    torch.testing.assert_close(losses, torch.tensor([0.0625, 1.0, 3.0625]))
    torch.testing.assert_close(chosen_r, torch.tensor([0.5, 0.0, -0.5]))  # summed, as for DPO


def test_simpo_hand_computed():
    """SimPO, γ = 0.5: rewards β·π/|y|: pair 1: 0.5·(−10/2) = −2.5 and 0.5·(−12/4) = −1.5;
    pair 2: −0.5 and −0.5; pair 3: 0.5·(−12/4) = −1.5 and 0.5·(−10/2) = −2.5.
    L = sp(r⁺ − r⁻ − γ) = [sp(−1.5), sp(−0.5), sp(0.5)] = [1.70141328, 0.97407698, 0.47407698]."""
    losses, chosen_r, rejected_r = loss_of("simpo", ref_c=None, ref_r=None, simpo_gamma=0.5)
    torch.testing.assert_close(losses, torch.tensor([1.70141328, 0.97407698, 0.47407698]))
    torch.testing.assert_close(chosen_r, torch.tensor([-2.5, -0.5, -1.5]))
    torch.testing.assert_close(rejected_r, torch.tensor([-1.5, -0.5, -2.5]))


def test_simpo_ignores_the_reference():
    """Reference-free: any reference log-probs give the same loss as none at all."""
    without, _, _ = loss_of("simpo", ref_c=None, ref_r=None)
    with_ref, _, _ = loss_of("simpo", ref_c=REF_C * 7, ref_r=REF_R - 3)
    torch.testing.assert_close(without, with_ref)


def test_policy_equal_to_reference_gives_ln2_exactly():
    """At initialisation π = π_ref, so Δ = 0 and the sigmoid loss is −log σ(0) = ln 2, exactly."""
    logps = torch.tensor([-3.0, -250.5, -0.125])
    losses, chosen_r, rejected_r = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))
    assert torch.equal(chosen_r, torch.zeros(3)) and torch.equal(rejected_r, torch.zeros(3))


def test_swapping_chosen_and_rejected_flips_delta():
    """Swap y⁺ and y⁻: the rewards trade places, so Δ (and the margin) changes sign; for the
    sigmoid loss this means L(−x) = L(x) + x, with x = βΔ."""
    losses, chosen_r, rejected_r = loss_of("sigmoid")
    swapped, chosen_s, rejected_s = loss_of("sigmoid", pi_c=PI_R, pi_r=PI_C, ref_c=REF_R,
                                            ref_r=REF_C)
    torch.testing.assert_close(chosen_s - rejected_s, -(chosen_r - rejected_r))
    torch.testing.assert_close(swapped, losses + (chosen_r - rejected_r))


# Where a loss does not raise log π(y⁺) and lower log π(y⁻) on all three pairs, and why.
GRADIENT_EXCEPTIONS = {
    "hinge": ([1, 2], [1, 2]),  # pair 1's margin βΔ = 1 is past the hinge: no gradient
    "sppo_hard": ([1, 2], [1, 2]),  # pair 1's log-ratios sit at their targets ±1/(2β) already
    "discopop": ([0, 2], [0, 2]),  # at Δ = 0 its gradient points the other way (delta.py)
    "apo_down": (None, [0, 1, 2]),  # lowers the chosen likelihood too, on purpose
    "sft": ([0, 1, 2], None),  # reads the chosen responses only
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    """A gradient-descent step moves log π(y⁺) up and log π(y⁻) down, for every loss type, on
    the pairs where it pushes at all (`GRADIENT_EXCEPTIONS`)."""
    pi_c, pi_r = PI_C.clone().requires_grad_(), PI_R.clone().requires_grad_()
    losses, _, _ = loss_of(loss_type, pi_c=pi_c, pi_r=pi_r)
    losses.sum().backward()
    up, down = GRADIENT_EXCEPTIONS.get(loss_type, ([0, 1, 2], [0, 1, 2]))
    if up is not None:
        assert (pi_c.grad[up] < 0).all(), pi_c.grad
    if down is not None:
        assert (pi_r.grad[down] > 0).all(), pi_r.grad


def test_sigmoid_gradient_is_weighted_by_sigma_of_minus_beta_delta():
    """∂L/∂log π(y⁺) = −β·σ(−βΔ): hard pairs (Δ < 0) get a larger push than easy ones."""
    pi_c = PI_C.clone().requires_grad_()
    loss_of("sigmoid", pi_c=pi_c)[0].sum().backward()
    expected = -BETA * torch.sigmoid(-BETA * torch.tensor([2.0, 0.0, -2.0]))
    torch.testing.assert_close(pi_c.grad, expected)


def test_zero_label_smoothing_is_plain_dpo():
    """ε = 0 in both smoothed variants reduces to −log σ(βΔ)."""
    plain = -torch.nn.functional.logsigmoid(BETA * torch.tensor([2.0, 0.0, -2.0]))
    for loss_type in ("sigmoid", "robust"):
        torch.testing.assert_close(loss_of(loss_type, label_smoothing=0.0)[0], plain)


def test_rewards_are_detached():
    pi_c = PI_C.clone().requires_grad_()
    for loss_type in LOSS_TYPES:
        _, chosen_r, rejected_r = loss_of(loss_type, pi_c=pi_c)
        assert not chosen_r.requires_grad and not rejected_r.requires_grad


def test_sft_is_the_token_mean():
    """sft: −(−10 − 5 − 12) / (2 + 5 + 4) = 27 / 11 = 2.4545455, the mean of the per-pair values
    −log π(y⁺_i)·B/N = 30/11, 15/11, 36/11."""
    losses, _, _ = loss_of("sft")
    torch.testing.assert_close(losses, torch.tensor([30 / 11, 15 / 11, 36 / 11]))
    torch.testing.assert_close(losses.mean(), torch.tensor(27 / 11))


def test_sft_divides_by_the_given_token_count():
    """Split the batch above into micro-batches {0} and {1, 2} of one step (mean of the two):
    each divides by the step's 11 tokens / 2 micro-batches, and the mean is the step's token
    mean, 27/11 — where dividing each by its own count gives (10/2 + 17/9) / 2 = 3.4444."""
    def half(rows, **kw):
        return dpo_loss(PI_C[rows], PI_R[rows], None, None, beta=BETA, loss_type="sft",
                        chosen_lengths=LEN_C[rows], rejected_lengths=LEN_R[rows], **kw)[0].mean()

    halves = [half(rows, num_tokens=11 / 2) for rows in ([0], [1, 2])]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, torch.tensor(27 / 11))
    own = [half(rows) for rows in ([0], [1, 2])]
    torch.testing.assert_close((own[0] + own[1]) / 2, torch.tensor(31 / 9))


def test_a_mixture_is_the_weighted_sum_of_its_parts():
    """MPO: loss_type sigmoid + bco_pair + sft with weights 0.8, 0.2, 1.0 gives per pair
    0.8·L_sigmoid + 0.2·L_bco + 1.0·L_sft, each term returned unweighted; the rewards are the
    reference-based ones, β·log π/π_ref."""
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    losses, chosen_r, rejected_r, terms = loss_of(types, loss_weights=weights, return_terms=True)
    parts = [loss_of(t)[0] for t in types]
    assert list(terms) == types
    for name, part in zip(types, parts):
        torch.testing.assert_close(terms[name], part)
    torch.testing.assert_close(losses, sum(w * p for w, p in zip(weights, parts)))
    torch.testing.assert_close(chosen_r, BETA * (PI_C - REF_C))
    torch.testing.assert_close(rejected_r, BETA * (PI_R - REF_R))
    # One type with weight 1 is that type.
    torch.testing.assert_close(loss_of(["ipo"], loss_weights=[1.0])[0], loss_of("ipo")[0])


def test_rpo_is_dpo_plus_alpha_sft():
    """RPO (DPO + α·NLL on y⁺) is the mixture [sigmoid, sft] with weights [1, α]."""
    alpha = 0.5
    losses, _, _ = loss_of(["sigmoid", "sft"], loss_weights=[1.0, alpha])
    want = loss_of("sigmoid")[0] + alpha * loss_of("sft")[0]
    torch.testing.assert_close(losses, want)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"loss_type": "kto"}, "loss_type"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"label_smoothing": 0.6}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_type": "exo_pair", "label_smoothing": 0.0}, r"label_smoothing.*\(0.0, 0.5\)"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights: 1 weights"),
        ({"loss_type": ["sigmoid", "sigmoid"]}, "lists a type twice"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -1.0]}, "loss_weights"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau"),
        ({"loss_type": "sigmoid_norm"}, "chosen_lengths"),
        ({"loss_type": "sigmoid", "simpo_gamma": 0.5}, "simpo_gamma"),
        ({"loss_type": "ipo"}, "chosen_lengths"),
        ({"loss_type": "simpo", "chosen_lengths": LEN_C}, "rejected_lengths"),
        ({"ref_chosen_logps": None}, "ref_chosen_logps"),
        ({"policy_rejected_logps": PI_R[:2]}, "policy_rejected_logps"),
        ({"loss_type": "ipo", "chosen_lengths": LEN_C, "rejected_lengths": LEN_R[:1]},
         "rejected_lengths"),
        ({"policy_chosen_logps": PI_C[None], "policy_rejected_logps": PI_R[None],
          "ref_chosen_logps": REF_C[None], "ref_rejected_logps": REF_R[None]},
         "policy_chosen_logps"),
    ],
)
def test_invalid_inputs_name_the_parameter(kwargs, names):
    args = {"policy_chosen_logps": PI_C, "policy_rejected_logps": PI_R,
            "ref_chosen_logps": REF_C, "ref_rejected_logps": REF_R, "beta": BETA}
    args.update(kwargs)
    with pytest.raises(ValueError, match=names):
        dpo_loss(args.pop("policy_chosen_logps"), args.pop("policy_rejected_logps"),
                 args.pop("ref_chosen_logps"), args.pop("ref_rejected_logps"), **args)


def test_label_smoothing_boundaries_are_accepted():
    """ε = 0.5 is allowed for cDPO (the labels carry no information: L = sp(x) + x/2, symmetric)."""
    losses, _, _ = loss_of("sigmoid", label_smoothing=0.5)
    torch.testing.assert_close(losses[0], losses[2])
    loss_of("robust", label_smoothing=0.49)
