"""The Δ family (dpo/loss/delta.py) by hand, on the three pairs of tests/test_loss.py (β = 0.5):
βΔ = +1, 0, −1; log-ratios log π/π_ref of y⁺ = +1, 0, −1 and of y⁻ = −1, 0, +1; token counts
|y⁺| = 2, 5, 4 and |y⁻| = 4, 5, 2. sp(x) = −log σ(x): sp(1) = 0.31326169, sp(0) = ln 2,
sp(−1) = 1.31326169."""
import math

import torch

from tests.test_loss import LEN_C, LEN_R, PI_C, PI_R, REF_C, REF_R, loss_of


def close(got, want):
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_exo_pair_hand_computed():
    """L = σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε), z = βΔ. At z = 0 both weights
    are ½: L = ½·log(1/(4ε(1−ε))); ε = 0.1 gives ½·ln(1/0.36) = 0.51082562. With ε unset EXO
    takes 1e-3: at z = 0, ½·ln(1/(4·0.000999)) = 2.76123071."""
    close(loss_of("exo_pair", label_smoothing=0.1)[0], [0.11408211, 0.51082562, 1.12945728])
    close(loss_of("exo_pair")[0], [1.27630984, 2.76123071, 4.46803972])


def test_exo_pair_is_smallest_where_the_model_agrees_with_the_smoothed_labels():
    """The reverse KL to (1−ε, ε) is 0 exactly where σ(βΔ) = 1 − ε, i.e. βΔ = log((1−ε)/ε)."""
    eps = 0.1
    z = math.log((1 - eps) / eps)
    pi_c = torch.tensor([z / 0.5 - 5.0])  # Δ = z/β with the other log-probs at −5
    loss = loss_of("exo_pair", pi_c=pi_c, pi_r=torch.tensor([-5.0]), ref_c=torch.tensor([-5.0]),
                   ref_r=torch.tensor([-5.0]), label_smoothing=eps)[0]
    torch.testing.assert_close(loss, torch.zeros(1), atol=1e-6, rtol=0)


def test_discopop_hand_computed():
    """L = (1 − m)·sp(z) + m·e^(−z), m = σ(z/τ), τ = 0.05. z = 0: m = ½, L = ½ ln 2 + ½ =
    0.84657359; z = ±1: m = σ(±20) ≈ 1 or 0, L ≈ e^(−1) = 0.36787944 or sp(−1) = 1.31326169."""
    close(loss_of("discopop")[0], [0.36787944, 0.84657359, 1.31326169])


def test_discopop_gradient_at_zero_points_away_from_the_preference():
    """dL/dz at z = 0 is (1/(4τ))·(1 − ln 2) − ¾ = 5·0.30685282 − 0.75 = 0.78426409 > 0: at
    step 0 (π = π_ref, every Δ = 0) DiscoPOP's first step lowers Δ. With β = 0.5,
    ∂L/∂log π(y⁺) = β·dL/dz = 0.39213205. (The non-convexity the DiscoPOP paper reports.)"""
    pi_c = PI_C.clone().requires_grad_()
    loss_of("discopop", pi_c=pi_c)[0].sum().backward()
    torch.testing.assert_close(pi_c.grad[1], torch.tensor(0.5 * (5 * (1 - math.log(2)) - 0.75)))


def test_sigmoid_norm_hand_computed():
    """Δ̄ = (+1)/2 − (−1)/4 = 0.75, 0, (−1)/4 − (+1)/2 = −0.75; L = sp(βΔ̄) = sp(0.375) =
    0.52312326, ln 2, sp(−0.375) = 0.89812326."""
    close(loss_of("sigmoid_norm")[0], [0.52312326, 0.69314718, 0.89812326])


def test_aot_sorts_the_policy_and_reference_log_ratios():
    """Paired AOT: log π(y⁺) − log π(y⁻) = 2, 0, −2 sorts to −2, 0, 2; the reference's (all 0)
    stays 0, 0, 0; so d = −2, 0, 2 and L = sp(−1), sp(0), sp(1) in sorted order — not pair by
    pair. Unpaired AOT sorts the log-ratios of y⁺ (−1, 0, 1) and of y⁻ (−1, 0, 1) apart: d = 0,
    and every L = ln 2, although pair 3 is ranked wrong."""
    close(loss_of("aot")[0], [1.31326169, 0.69314718, 0.31326169])
    close(loss_of("aot_unpaired")[0], [0.69314718] * 3)


def test_aot_mean_does_not_depend_on_the_order_of_the_pairs():
    order = torch.tensor([2, 0, 1])
    for name in ("aot", "aot_unpaired"):
        shuffled = loss_of(name, pi_c=PI_C[order], pi_r=PI_R[order], ref_c=REF_C[order],
                           ref_r=REF_R[order])[0]
        torch.testing.assert_close(shuffled.mean(), loss_of(name)[0].mean())


def test_the_length_normalised_losses_use_the_counts():
    """Doubling both responses' token counts halves Δ̄."""
    halved = loss_of("sigmoid_norm", chosen_lengths=2 * LEN_C, rejected_lengths=2 * LEN_R)[0]
    close(halved, [-torch.nn.functional.logsigmoid(torch.tensor(0.1875)).item(), 0.69314718,
                   -torch.nn.functional.logsigmoid(torch.tensor(-0.1875)).item()])
    assert not torch.equal(halved, loss_of("sigmoid_norm")[0])


def test_f_divergence_score_differences_by_hand():
    """The score difference of each f-divergence on pair 1 (log-ratios l⁺ = 1, l⁻ = −1), and the
    sigmoid loss on it (β = 0.5):

    - reverse_kl: Δ = 2, L = sp(1) = 0.31326169 (DPO);
    - forward_kl: Δ = e − e⁻¹ = 2.35040239, L = sp(1.17520119) = 0.26907772;
    - js_divergence: Δ = 2 − (softplus(1) − softplus(−1)) = 2 − 1 = 1, L = sp(0.5) = 0.47407698;
    - alpha_divergence, α = 0.5: Δ = (e^0.5 − e^−0.5)/0.5 = 2.08438122, L = sp(1.04219061) =
      0.30208873.

    Pair 2 (π = π_ref) has Δ = 0 under every divergence: L = ln 2. Pair 3 mirrors pair 1."""
    want = {"reverse_kl": 0.31326169, "forward_kl": 0.26907772, "js_divergence": 0.47407698,
            "alpha_divergence": 0.30208873}
    for kind, first in want.items():
        losses = loss_of("sigmoid", f_divergence_type=kind)[0]
        torch.testing.assert_close(losses[:2], torch.tensor([first, math.log(2)]))
        assert losses[2] > losses[1] > losses[0]


def test_alpha_divergence_coefficient_one_is_forward_kl():
    torch.testing.assert_close(
        loss_of("hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)[0],
        loss_of("hinge", f_divergence_type="forward_kl")[0])


def test_f_divergence_exponentials_do_not_overflow():
    """A log-ratio of −1000 would make e^(−l) overflow float32: it is capped, the loss finite."""
    pi_c = torch.tensor([-1010.0])
    losses = loss_of("sigmoid", pi_c=pi_c, pi_r=torch.tensor([-5.0]), ref_c=torch.tensor([-10.0]),
                     ref_r=torch.tensor([-5.0]), f_divergence_type="forward_kl")[0]
    assert torch.isfinite(losses).all()
