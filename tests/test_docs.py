"""The formulas of docs/dpo.md on hand-computed numbers, and the doc's links, so it cannot rot.

Write σ(x) = 1/(1 + e^−x) and sp(x) = −log σ(x) = log(1 + e^−x). The doc's worked example is one
pair with β = 0.1 (summed log-probs):

    log π(y⁺|x) = −42.0   log π_ref(y⁺|x) = −45.0   → log-ratio on y⁺ = +3.0
    log π(y⁻|x) = −57.5   log π_ref(y⁻|x) = −55.5   → log-ratio on y⁻ = −2.0
    Δ = 3.0 − (−2.0) = 5.0,   βΔ = 0.5
"""
import ast
import json
import math
import re
from pathlib import Path

import pytest
import torch

from dpo.model.forward import PairLogps
from dpo.loss import dpo_loss
from dpo.train.metrics import PAIR_KEYS, pair_stats
from dpo.train.step import StepOutput

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "dpo.md"

# The worked example of the doc, as (B,) = (1,) tensors.
PI_C, REF_C = torch.tensor([-42.0]), torch.tensor([-45.0])
PI_R, REF_R = torch.tensor([-57.5]), torch.tensor([-55.5])


def worked_example(beta, **kw):
    return dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=beta, **kw)


# --- The formulas ---------------------------------------------------------------------------

def test_worked_example_loss_and_implicit_rewards():
    """β = 0.1: rewards r̂⁺ = β·(−42 − (−45)) = 0.3 and r̂⁻ = β·(−57.5 − (−55.5)) = −0.2;
    margin r̂⁺ − r̂⁻ = βΔ = 0.5; σ(0.5) = 0.62245933; L = sp(0.5) = −ln 0.62245933 = 0.47407698.
    Accuracy 1: the chosen reward is the larger."""
    losses, chosen_r, rejected_r = worked_example(0.1)
    torch.testing.assert_close(chosen_r, torch.tensor([0.3]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.2]))
    torch.testing.assert_close(losses, torch.tensor([0.47407698]))


@pytest.mark.parametrize("beta, loss, weight", [
    (0.1, 0.47407698, 0.37754067),  # βΔ = 0.5: sp(0.5), σ(−0.5)
    (0.3, 0.20141328, 0.18242552),  # βΔ = 1.5: sp(1.5), σ(−1.5)
    (1.0, 0.00671535, 0.00669285),  # βΔ = 5:   sp(5) = log(1 + e^−5), σ(−5)
])
def test_worked_example_as_beta_grows(beta, loss, weight):
    """The same log-probs under a larger β: the pair's loss falls towards 0 and its gradient
    weight σ(−βΔ) with it, so a larger β stops pushing a pair after a smaller move away from the
    reference. The gradients: ∂L/∂log π(y⁺) = −β·σ(−βΔ), ∂L/∂log π(y⁻) = +β·σ(−βΔ);
    β = 0.1: ∓0.1 · 0.37754067 = ∓0.03775407."""
    pi_c, pi_r = PI_C.clone().requires_grad_(), PI_R.clone().requires_grad_()
    losses, _, _ = dpo_loss(pi_c, pi_r, REF_C, REF_R, beta=beta)
    losses.sum().backward()
    torch.testing.assert_close(losses, torch.tensor([loss]))
    torch.testing.assert_close(pi_c.grad, torch.tensor([-beta * weight]))
    torch.testing.assert_close(pi_r.grad, torch.tensor([beta * weight]))


def test_bradley_terry_probability_is_exp_of_minus_loss():
    """Bradley–Terry: p(y⁺ ≻ y⁻) = e^r⁺ / (e^r⁺ + e^r⁻) = σ(r⁺ − r⁻). With DPO's implicit
    rewards 0.3 and −0.2: e^0.3 / (e^0.3 + e^−0.2) = 1.34985881 / (1.34985881 + 0.81873075)
    = 0.62245933 = σ(0.5) = exp(−L). Adding any c(x) to both rewards changes nothing."""
    losses, chosen_r, rejected_r = worked_example(0.1)
    for shift in (0.0, 5.0, -20.0):
        a, b = torch.exp(chosen_r + shift), torch.exp(rejected_r + shift)
        torch.testing.assert_close(a / (a + b), torch.tensor([0.62245933]))
    torch.testing.assert_close(torch.exp(-losses), torch.tensor([0.62245933]))


def test_accuracy_counts_ties_as_wrong():
    """At step 0 π = π_ref: both rewards are 0, the margin is 0, the loss is ln 2 = 0.69314718,
    and the accuracy (chosen reward strictly larger) is 0, not 0.5. One pair ahead by 0.5 and
    one tied: accuracy (1 + 0)/2 = 0.5."""
    logps = torch.tensor([-42.0, -57.5])
    losses, chosen_r, rejected_r = dpo_loss(logps, logps - 2, logps, logps - 2, beta=0.1)
    stats = dict(zip(PAIR_KEYS, pair_stats(StepOutput(_pair_logps(2), losses, chosen_r, rejected_r, {})).T))
    torch.testing.assert_close(stats["loss"], torch.full((2,), math.log(2)))
    assert stats["rewards/margins"].tolist() == [0.0, 0.0]
    assert stats["rewards/accuracies"].tolist() == [0.0, 0.0]

    pi_c, pi_r = torch.tensor([-42.0, -5.0]), torch.tensor([-57.5, -5.0])
    ref_c, ref_r = torch.tensor([-45.0, -5.0]), torch.tensor([-55.5, -5.0])
    losses, chosen_r, rejected_r = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    stats = dict(zip(PAIR_KEYS, pair_stats(StepOutput(_pair_logps(2), losses, chosen_r, rejected_r, {})).T))
    assert stats["rewards/accuracies"].mean().item() == 0.5


def _pair_logps(batch):
    zeros = torch.zeros(batch)
    return PairLogps(zeros, zeros, zeros, zeros, zeros, zeros)


# A tiny discrete world: one prompt, three possible responses.
REF = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # π_ref(y|x)
REWARD = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)  # r(x, y)
BETA = 0.5


def kl_regularised_objective(pi):
    """J(π) = Σ_y π(y)·r(y) − β·Σ_y π(y)·log(π(y)/π_ref(y))."""
    return (pi * REWARD).sum() - BETA * (pi * (pi / REF).log()).sum()


def test_optimal_policy_closed_form_on_a_discrete_example():
    """π*(y) = π_ref(y)·exp(r(y)/β) / Z with exp(r/β) = [e², 1, e⁻²] = [7.3890561, 1, 0.1353353]:
    π_ref·exp(r/β) = [3.6945280, 0.3, 0.0270671], Z = 4.0215951, π* = [0.9186723, 0.0745973,
    0.0067304]. J(π*) = β·log Z = 0.5 · 1.3916786 = 0.6958393, and no other policy does better
    (J(π_ref) = 0.3)."""
    weights = REF * torch.exp(REWARD / BETA)
    z = weights.sum()
    pi_star = weights / z
    torch.testing.assert_close(z, torch.tensor(4.0215951, dtype=torch.float64))
    torch.testing.assert_close(pi_star, torch.tensor([0.9186723, 0.0745973, 0.0067304],
                                                     dtype=torch.float64))
    torch.testing.assert_close(kl_regularised_objective(pi_star), BETA * z.log())
    torch.testing.assert_close(kl_regularised_objective(REF),
                               torch.tensor(0.3, dtype=torch.float64))
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):  # random policies, and small moves away from π*
        other = torch.rand(3, generator=generator, dtype=torch.float64)
        for pi in (other / other.sum(), (pi_star + 0.01 * other) / (1 + 0.01 * other.sum())):
            assert kl_regularised_objective(pi) < kl_regularised_objective(pi_star)


def test_implicit_reward_recovers_the_reward_and_z_cancels():
    """β·log(π*/π_ref) = r − β·log Z = [1 − 0.6958393, −0.6958393, −1.6958393]
    = [0.3041607, −0.6958393, −1.6958393]: the reward up to a constant of the prompt. In a
    difference the constant cancels, so the DPO loss of π* on the pair (y₁ ≻ y₂) is the
    Bradley–Terry loss of the true reward: sp(r(y₁) − r(y₂)) = sp(1) = 0.31326169."""
    pi_star = REF * torch.exp(REWARD / BETA)
    pi_star = pi_star / pi_star.sum()
    implicit = BETA * (pi_star / REF).log()
    torch.testing.assert_close(implicit, torch.tensor([0.3041607, -0.6958393, -1.6958393],
                                                      dtype=torch.float64))
    log_pi, log_ref = pi_star.log(), REF.log()
    losses, chosen_r, rejected_r = dpo_loss(log_pi[:1], log_pi[1:2], log_ref[:1], log_ref[1:2],
                                            beta=BETA)
    torch.testing.assert_close(losses, torch.tensor([0.31326169], dtype=torch.float64))
    torch.testing.assert_close(chosen_r - rejected_r, torch.tensor([1.0], dtype=torch.float64))


def test_cdpo_stops_pushing_at_the_log_odds_of_the_noise():
    """cDPO's loss (1−ε)·sp(x) + ε·sp(−x), x = βΔ, has slope −(1−ε)·σ(−x) + ε·σ(x), zero at
    x = log((1−ε)/ε); for ε = 0.1 that is ln 9 = 2.1972246, where σ(x) = 0.9 and
    −0.9·0.1 + 0.1·0.9 = 0. Plain DPO (ε = 0) still pushes there: −σ(−ln 9) = −0.1 per unit x."""
    beta = 0.5
    x = math.log(9)
    for eps, slope in ((0.1, 0.0), (0.0, -0.1)):
        pi_c = torch.tensor([-5.0 + x / beta], requires_grad=True)  # Δ = x/β against ref −5
        losses, _, _ = dpo_loss(pi_c, torch.tensor([-5.0]), torch.tensor([-5.0]),
                                torch.tensor([-5.0]), beta=beta, label_smoothing=eps)
        losses.sum().backward()
        torch.testing.assert_close(pi_c.grad, torch.tensor([beta * slope]), atol=1e-6, rtol=0)


def test_reference_free_dpo_is_a_zero_reference():
    """With log π_ref = 0 (a flat reference) DPO becomes −log σ(β·(log π(y⁺) − log π(y⁻))):
    β = 0.1, −42 − (−57.5) = 15.5, sp(1.55) = 0.19247647 — the seed's "bare log-likelihood
    difference", but inside a sigmoid, so it saturates instead of growing forever."""
    zeros = torch.zeros(1)
    losses, _, _ = dpo_loss(PI_C, PI_R, zeros, zeros, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.19247647]))


# --- The doc's links --------------------------------------------------------------------------

def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assigned names, and methods of classes, in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


TEST_LINK = re.compile(r"(tests/test_\w+\.py)::(test_\w+)")
FILE_LINK = re.compile(r"\b((?:dpo|tests|configs|bench)/[\w/.-]+\.(?:py|yaml|json)|train\.py)\b")
SYMBOL_LINK = re.compile(r"\[`(\w+)`\]\(\.\./([\w/]+\.py)(?:#[^)]*)?\)")


def test_doc_links_only_to_existing_tests():
    links = TEST_LINK.findall(_doc())
    assert len(links) >= 15, "the doc links each formula to its test"
    missing = [f"{path}::{name}" for path, name in links
               if not (ROOT / path).is_file() or name not in _defined_names(ROOT / path)]
    assert not missing, f"docs/dpo.md links to tests that do not exist: {missing}"


def test_doc_links_only_to_existing_files():
    paths = set(FILE_LINK.findall(_doc()))
    assert "dpo/loss/__init__.py" in paths
    missing = sorted(path for path in paths if not (ROOT / path).is_file())
    assert not missing, f"docs/dpo.md names files that do not exist: {missing}"


def test_doc_sends_readers_to_the_textbook_step_first():
    """Before §1, and before any other file of the package, the doc links `dpo/textbook.py`."""
    intro = _doc()[:_doc().index("## 1. ")]
    assert re.findall(r"\(\.\./(dpo/[\w/]+\.py)\)", intro)[:1] == ["dpo/textbook.py"]


def test_doc_symbol_links_point_to_definitions():
    """A link [`name`](../dpo/file.py) promises that `name` is defined in that file."""
    links = SYMBOL_LINK.findall(_doc())
    assert links
    missing = [f"{path}:{name}" for name, path in links
               if name not in _defined_names(ROOT / path)]
    assert not missing, f"docs/dpo.md links to names its files do not define: {missing}"


# --- The real pair of §1 ---------------------------------------------------------------------

def test_the_real_pair_of_section_1_is_in_the_hh_test_split():
    """docs/dpo.md §1 quotes one real HH-RLHF pair as chosen / rejected: it is there, that way."""
    import gzip

    from tests.conftest import SHARED_DATA, require_shared

    path = require_shared(SHARED_DATA / "hh_rlhf_helpful_base_test.jsonl.gz")
    prompt = "\n\nHuman: Do you know the singer Adele?\n\nAssistant: "
    want = {"chosen": prompt + "Sure. She’s a very popular singer.",
            "rejected": prompt + "No, I’m sorry, I’m afraid I don’t."}
    with gzip.open(path, "rt") as f:
        assert any(json.loads(line) == want for line in f)
    for text in ("Do you know the singer Adele?", "Sure. She’s a very popular singer.",
                 "No, I’m sorry, I’m afraid I don’t."):
        assert text in _doc()
