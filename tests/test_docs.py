"""The formulas of docs/dpo.md on hand-computed numbers, and the doc's links, so it cannot rot.

Write σ(z) = 1/(1 + e^−z), and −log σ(z) = log(1 + e^−z) for the logistic loss of a margin z
(softplus(−z)); x is the prompt. The doc's worked example is one
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
    margin r̂⁺ − r̂⁻ = βΔ = 0.5; σ(0.5) = 0.62245933; L = −log σ(0.5) = −ln 0.62245933 = 0.47407698.
    Accuracy 1: the chosen reward is the larger."""
    losses, chosen_r, rejected_r = worked_example(0.1)
    torch.testing.assert_close(chosen_r, torch.tensor([0.3]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.2]))
    torch.testing.assert_close(losses, torch.tensor([0.47407698]))


@pytest.mark.parametrize("beta, loss, weight", [
    (0.1, 0.47407698, 0.37754067),  # βΔ = 0.5: −log σ(0.5), σ(−0.5)
    (0.3, 0.20141328, 0.18242552),  # βΔ = 1.5: −log σ(1.5), σ(−1.5)
    (1.0, 0.00671535, 0.00669285),  # βΔ = 5:   −log σ(5) = log(1 + e^−5), σ(−5)
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
    Bradley–Terry loss of the true reward: −log σ(r(y₁) − r(y₂)) = −log σ(1) = 0.31326169."""
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
    """cDPO's loss −(1−ε)·log σ(z) − ε·log σ(−z), z = βΔ, has slope −(1−ε)·σ(−z) + ε·σ(z), zero
    at z = log((1−ε)/ε); for ε = 0.1 that is ln 9 = 2.1972246, where σ(z) = 0.9 and
    −0.9·0.1 + 0.1·0.9 = 0. Plain DPO (ε = 0) still pushes there: −σ(−ln 9) = −0.1 per unit z."""
    beta = 0.5
    z = math.log(9)
    for eps, slope in ((0.1, 0.0), (0.0, -0.1)):
        pi_c = torch.tensor([-5.0 + z / beta], requires_grad=True)  # Δ = z/β against ref −5
        losses, _, _ = dpo_loss(pi_c, torch.tensor([-5.0]), torch.tensor([-5.0]),
                                torch.tensor([-5.0]), beta=beta, label_smoothing=eps)
        losses.sum().backward()
        torch.testing.assert_close(pi_c.grad, torch.tensor([beta * slope]), atol=1e-6, rtol=0)


def test_reference_free_dpo_is_a_zero_reference():
    """With log π_ref = 0 (a flat reference) DPO becomes −log σ(β·(log π(y⁺) − log π(y⁻))):
    β = 0.1, −42 − (−57.5) = 15.5, −log σ(1.55) = 0.19247647 — the seed's "bare log-likelihood
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


# --- Section 1's real pair, carried through ---------------------------------------------------

ADELE_PROMPT = "Do you know the singer Adele?"
ADELE_CHOSEN = "Sure. She’s a very popular singer."
ADELE_REJECTED = "No, I’m sorry, I’m afraid I don’t."


@pytest.fixture(scope="module")
def adele(qwen3_tokenizer):
    """Section 1's HH-RLHF pair, normalised and tokenized as a run does (Qwen3's chat template,
    thinking off)."""
    from datasets import Dataset

    from dpo.data.formats import normalise
    from dpo.data.tokenize import tokenize_preferences

    hh = f"\n\nHuman: {ADELE_PROMPT}\n\nAssistant: "
    rows = normalise(Dataset.from_list([{"chosen": hh + ADELE_CHOSEN,
                                         "rejected": hh + ADELE_REJECTED}]))
    return tokenize_preferences(rows, qwen3_tokenizer, max_length=128,
                                chat_template_kwargs={"enable_thinking": False})[0][0]


def test_the_real_pair_tokenizes_to_a_shared_prompt_and_two_responses(adele, qwen3_tokenizer):
    """§1: 30 and 34 tokens, the first 20 (the prompt, with Qwen3's empty thinking block) shared
    and labelled −100; then the responses, labelled with their own ids: 10 tokens for y⁺, 14 for
    y⁻, each ending in <|im_end|>."""
    pieces = {}
    for side in ("chosen", "rejected"):
        ids, labels = adele[f"{side}_input_ids"], adele[f"{side}_labels"]
        assert labels[:20] == [-100] * 20 and -100 not in labels[20:]
        assert labels[20:] == ids[20:]
        pieces[side] = [qwen3_tokenizer.decode([i]) for i in ids[20:]]
    assert adele["chosen_input_ids"][:20] == adele["rejected_input_ids"][:20]
    assert qwen3_tokenizer.decode(adele["chosen_input_ids"][:20]) == (
        f"<|im_start|>user\n{ADELE_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\n")
    assert pieces["chosen"] == ["Sure", ".", " She", "’s", " a", " very", " popular", " singer",
                                ".", "<|im_end|>"]
    assert pieces["rejected"] == ["No", ",", " I", "’m", " sorry", ",", " I", "’m", " afraid",
                                  " I", " don", "’t", ".", "<|im_end|>"]
    assert "|y⁺| = 10" in _doc() and "|y⁻| = 14" in _doc()


def test_the_real_pair_at_step_zero_on_a_random_tiny_qwen3(adele, qwen3_tokenizer):
    """§6 and §11: `tiny_qwen3(151669, seed=0)` as both π and π_ref (β = 0.1) gives the Adele pair
    log π(y⁺|x) = −119.79 over 10 tokens and log π(y⁻|x) = −166.98 over 14, per token −11.98 and
    −11.93 (−ln 151669 = −11.93: near uniform); log-ratios 0, so rewards 0 and loss ln 2."""
    from dpo.data.batching import PreferenceCollator
    from dpo.demo.tiny import tiny_qwen3
    from dpo.textbook import textbook_dpo_step

    model = tiny_qwen3(len(qwen3_tokenizer), seed=0)
    batch = PreferenceCollator(qwen3_tokenizer.pad_token_id)([adele])
    with torch.no_grad():
        step = textbook_dpo_step(model, model, batch, 0.1, backward=False)
    logps = torch.cat([step.chosen_logps, step.rejected_logps])
    torch.testing.assert_close(logps, torch.tensor([-119.79, -166.98]), atol=5e-3, rtol=0)
    torch.testing.assert_close(logps / torch.tensor([10.0, 14.0]),
                               torch.tensor([-11.98, -11.93]), atol=5e-3, rtol=0)
    assert step.chosen_rewards.item() == step.rejected_rewards.item() == 0.0
    torch.testing.assert_close(step.losses, torch.tensor([math.log(2)]))
    assert "log π(y⁺|x) = −119.79 and log π(y⁻|x) = −166.98" in _doc()


def test_ipo_target_is_per_token_and_sppo_puts_delta_at_one_over_beta():
    """IPO here regresses the per-token Δ̄ to 1/(2β): 5 nats/token at β = 0.1, met by the Adele
    pair's lengths (10, 14) with summed log-ratios +25 and −35 (2.5 + 2.5 = 5); 0.5 nats/token at
    β = 1 (+2.5/10 + 3.5/14). The IPO paper's summed target, Δ = 5 split +2.5/−2.5, is far off
    here: (0.25 + 0.17857143 − 5)² = 20.89795918. SPPO pins each summed log-ratio at ±1/(2β), so
    its minimum is Δ = 1/β = 10 at β = 0.1: +5/−5 gives 0; Δ = 5 (+2.5/−2.5) gives 2·2.5² = 12.5."""
    ref = torch.tensor([-100.0])
    lengths = dict(chosen_lengths=torch.tensor([10.0]), rejected_lengths=torch.tensor([14.0]))

    def loss(loss_type, chosen, rejected, beta=0.1):
        return dpo_loss(ref + chosen, ref + rejected, ref, ref, beta=beta, loss_type=loss_type,
                        **lengths)[0]

    torch.testing.assert_close(loss("ipo", 25.0, -35.0), torch.tensor([0.0]))
    torch.testing.assert_close(loss("ipo", 2.5, -3.5, beta=1.0), torch.tensor([0.0]))
    torch.testing.assert_close(loss("ipo", 2.5, -2.5), torch.tensor([20.89795918]))
    torch.testing.assert_close(loss("sppo_hard", 5.0, -5.0), torch.tensor([0.0]))
    torch.testing.assert_close(loss("sppo_hard", 2.5, -2.5), torch.tensor([12.5]))


# --- Section 13 lists every logged metric -----------------------------------------------------

class _OneProcess:
    """An accelerator of one process: reductions and gathers are the identity."""

    num_processes, process_index = 1, 0

    @staticmethod
    def reduce(tensor, reduction):
        return tensor

    @staticmethod
    def gather_for_metrics(tensor):
        return tensor


class _Logger:
    def __init__(self):
        self.logged: dict[str, float] = {}

    def log(self, step, metrics):
        self.logged.update(metrics)


def _step_output(cfg, pairs: int) -> StepOutput:
    """A batch's output with every optional column: a mixture's terms, the router loss, WPO."""
    ones = torch.ones(pairs)
    return StepOutput(_pair_logps(pairs), ones, ones, -ones, {t: ones for t in cfg.loss_type},
                      torch.tensor(0.5), ones / 2)


def _logged_keys(monkeypatch) -> tuple[set, set, set]:
    """(per-pair keys, other train keys, eval keys) as the trainer logs them, with every option
    that adds a key switched on: a mixture (with ORPO), a mixture of experts, WPO, a skipped
    step, two datasets and a judge."""
    import time
    from types import SimpleNamespace

    from datasets import Dataset

    from dpo.eval import evaluation
    from dpo.train.metrics import TrainMetrics, log_train, pair_keys


    cfg = SimpleNamespace(loss_type=("sigmoid", "bco_pair", "orpo"), router_aux_loss_coef=0.01,
                          use_weighting=True)
    keys = pair_keys(cfg)
    accelerator, logger = _OneProcess(), _Logger()
    metrics = TrainMetrics(torch.device("cpu"), keys)
    metrics.add_batch(pair_stats(_step_output(cfg, 2)), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    metrics.add_grad_norm(torch.tensor(1.0))
    scheduler = SimpleNamespace(get_last_lr=lambda: [1e-4])
    log_train(accelerator, logger, metrics, scheduler, 1, time.perf_counter(), 0.5, 1)

    monkeypatch.setattr(evaluation, "dpo_step", lambda *a, **k: _step_output(cfg, 2))
    # ORPO's NLL counts the eval set's chosen tokens
    batches = [{"input_ids": torch.zeros(4, 3), "source": torch.tensor([0, 1])}]
    batches = type("Loader", (list,), {"dataset": Dataset.from_dict(
        {"chosen_labels": [[-100, 1, 2]] * 2})})(batches)
    policy = SimpleNamespace(eval=lambda: None, train=lambda: None)
    results = evaluation.evaluate(accelerator, cfg, policy, None, batches, ["hh", "shp"])
    evaluator = evaluation.Evaluator.__new__(evaluation.Evaluator)
    evaluator.accelerator, evaluator.prompts = accelerator, [[1], [2]]
    evaluator.judge = SimpleNamespace(score=lambda prompts, answers: [1.0] * len(answers))
    evaluator.loader = SimpleNamespace(dataset=Dataset.from_dict(
        {"prompt_messages": [[{"role": "user", "content": "hi"}]] * 2}))
    evaluator.tokenizer = lambda text, add_special_tokens: {"input_ids": text.split()}
    evaluator.reference_answers, evaluator.reference_scores = ["a b", "c"], None
    evaluator.judged(["a", "b c"], results, 1)
    train_keys = set(logger.logged) - set(keys)

    def general(key):  # a name the run chose, as the table writes it
        return re.sub(r"^loss/\w+$", "loss/<type>", key)

    def general_eval(key):
        for name in ("hh", "shp"):
            if key.startswith(f"eval/{name}/") and key[len(name) + 6:] in keys:
                return "eval/<dataset>/<key>"
        return "eval/<key>" if key[5:] in keys else key

    # KTO's unpaired rows log their own per-row keys (`UNPAIRED_KEYS`), most of them shared.
    unpaired = pair_keys(SimpleNamespace(loss_type=("kto",), router_aux_loss_coef=0.0,
                                         use_weighting=False))
    return ({general(k) for k in (*keys, *unpaired)}, {general(k) for k in train_keys},
            {general_eval(k) for k in results})


def _section_13_tables() -> list[set[str]]:
    """The keys in the first column of each table of §13, one set per table."""
    section = _doc()[_doc().index("## 13. "):_doc().index("## 14. ")]
    tables, rows = [], None
    for line in section.splitlines():
        if line.startswith("| key |"):
            rows = set()
            tables.append(rows)
        elif line.startswith("|") and rows is not None and not line.startswith("|---"):
            rows.update(re.findall(r"`([^`]+)`", line.split(" | ")[0]))
        elif not line.startswith("|"):
            rows = None
    return tables


def test_section_13_lists_every_logged_metric(monkeypatch):
    """§13's three tables (per-pair keys; train-only; eval-only) are exactly the keys that
    `pair_keys`, `TrainMetrics.compute` with `log_train`, `evaluate` and `Evaluator.judged` log,
    with a run's own names (loss types, datasets) written as `<type>`, `<dataset>`."""
    per_pair, train, evals = _logged_keys(monkeypatch)
    documented = _section_13_tables()
    assert len(documented) == 3, "§13 has a per-pair, a train-only and an eval-only table"
    for what, logged, listed in (("per-pair", per_pair, documented[0]),
                                 ("train-only", train, documented[1]),
                                 ("eval-only", evals, documented[2])):
        assert logged == listed, (f"§13's {what} table: not listed {sorted(logged - listed)}, "
                                  f"listed but not logged {sorted(listed - logged)}")
