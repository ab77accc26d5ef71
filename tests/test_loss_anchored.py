"""The anchored family (dpo/loss/anchored.py) by hand, on the pairs of tests/test_loss.py
(β = 0.5): rewards r⁺ = β·log π/π_ref(y⁺) = 0.5, 0, −0.5 and r⁻ = −0.5, 0, 0.5; βΔ = 1, 0, −1.
sp(x) = −log σ(x): sp(0.5) = 0.47407698, sp(−0.5) = 0.97407698, sp(0) = ln 2; σ(0.5) =
0.62245933."""
import json

import torch

from dpo.loss import BCOBaseline
from tests.test_loss import loss_of


def close(got, want):
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_nca_pair_hand_computed():
    """L = sp(r⁺) + ½·sp(−r⁺) + ½·sp(−r⁻). Pair 2: 2 ln 2 = 1.38629436. Pair 1: 0.47407698 +
    ½·0.97407698 + ½·0.47407698 = 1.19815397; pair 3: 0.97407698 + ½·0.47407698 +
    ½·0.97407698 = 1.69815397."""
    close(loss_of("nca_pair")[0], [1.19815397, 1.38629436, 1.69815397])


def test_bco_pair_hand_computed():
    """L = sp(r⁺ − δ) + sp(−(r⁻ − δ)). δ = 0: pair 1 = 2·sp(0.5) = 0.94815397, pair 2 = 2 ln 2,
    pair 3 = 2·sp(−0.5) = 1.94815397. δ = 0.25: sp(0.25) + sp(0.75) = 0.57593942 + 0.38687101
    = 0.96281043 for pair 1."""
    close(loss_of("bco_pair")[0], [0.94815397, 1.38629436, 1.94815397])
    close(loss_of("bco_pair", bco_delta=0.25)[0], [0.96281043, 1.40187884, 1.96281043])


def test_sppo_hard_hand_computed():
    """L = (log-ratio⁺ − 1/(2β))² + (log-ratio⁻ + 1/(2β))², 1/(2β) = 1: pair 1 (1 − 1)² +
    (−1 + 1)² = 0; pair 2: 1 + 1 = 2; pair 3: 4 + 4 = 8."""
    close(loss_of("sppo_hard")[0], [0.0, 2.0, 8.0])


def test_apo_hand_computed():
    """apo_zero: (1 − σ(r⁺)) + σ(r⁻): pair 1 = 2σ(−0.5) = 0.75508134, pair 2 = 1, pair 3 =
    2σ(0.5) = 1.24491866. apo_down: σ(r⁺) + 1 − σ(βΔ): pair 1 = 0.62245933 + 1 − 0.73105858 =
    0.89140075, pair 2 = 1, pair 3 = 0.37754067 + 1 − 0.26894142 = 1.10859925."""
    close(loss_of("apo_zero")[0], [0.75508134, 1.0, 1.24491866])
    close(loss_of("apo_down")[0], [0.89140075, 1.0, 1.10859925])


class _OneProcess:
    device = torch.device("cpu")

    @staticmethod
    def reduce(tensor, reduction):
        return tensor


def test_bco_baseline_is_the_running_mean_of_every_reward():
    """Step 1 adds rewards (1, 3 | −1, 1) in two micro-batches: δ = 4/4 = 1, the same as one
    micro-batch of all four. Step 2 adds (5 | 7): δ = (4 + 12)/6 = 2.6667. δ is fixed within a
    step: it moves only at `update`."""
    whole, split = BCOBaseline(), BCOBaseline()
    whole.add(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0]))
    split.add(torch.tensor([1.0]), torch.tensor([-1.0]))
    split.add(torch.tensor([3.0]), torch.tensor([1.0]))
    assert split.mean == 0.0  # not before the step ends
    for baseline in (whole, split):
        baseline.update(_OneProcess())
        assert (baseline.mean, baseline.count) == (1.0, 4)
    whole.add(torch.tensor([5.0]), torch.tensor([7.0]))
    whole.update(_OneProcess())
    assert abs(whole.mean - 16 / 6) < 1e-12 and whole.count == 6
    restored = BCOBaseline()
    restored.load_state_dict(json.loads(json.dumps(whole.state_dict())))
    assert restored.state_dict() == whole.state_dict()
