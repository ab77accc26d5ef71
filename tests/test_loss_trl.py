"""The loss family against TRL 1.16's own code: `DPOTrainer._compute_loss` (and, for SimPO,
`CPOTrainer.cpo_loss`; for ORPO, `ORPOTrainer.get_batch_loss_metrics`) run on the same per-token
log-probs as `dpo_step`, variant by variant.

TRL's method is called on a stand-in `self` that holds only the attributes it reads, with stand-in
models that return given per-token outputs in place of TRL's fused LM head (`FusedCausalLMOutput`):
its formulas are TRL's, not copied here. Our side is the real `dpo_step` on stand-in models that
return the same logits, in float32 as both compute their log-probs: agreement to 1e-6.
The documented differences (docs/dpo.md §12, "Against TRL 1.16") are asserted as such.
"""
import contextlib
import math
from collections import defaultdict
from types import SimpleNamespace

import os

import pytest
import torch
from torch import nn

trl = pytest.importorskip("trl", reason="trl (the `test` extra) is the reference implementation "
                          "this parity test runs; the trainer itself never imports it")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

from dpo.config import ConfigError, TrainConfig  # noqa: E402
from dpo.loss import dpo_loss  # noqa: E402
from dpo.loss.reference_free import log1mexp  # noqa: E402
from dpo.train.metrics import pair_keys, pair_stats  # noqa: E402
from dpo.train.step import dpo_step  # noqa: E402

TOL = dict(rtol=1e-6, atol=1e-6)
VOCAB, BETA = 7, 0.5
# (prompt, chosen, rejected) token counts of each pair; lengths differ within pairs for LD-DPO
SHAPES = [(3, 5, 2), (2, 3, 6), (4, 4, 4), (1, 6, 3)]
GREEDY_PAIR = 3  # both responses are the policy's argmax tokens: a WPO weight above 1


def _batch():
    """A right-padded `[chosen; rejected]` batch and the two models' logits, `[2B, T, V]`."""
    g = torch.Generator().manual_seed(0)
    width = max(p + max(c, r) for p, c, r in SHAPES) + 1
    rows = 2 * len(SHAPES)
    policy = torch.randn(rows, width, VOCAB, generator=g, dtype=torch.float32) * 1.5
    reference = policy + 0.7 * torch.randn(rows, width, VOCAB, generator=g)
    ids = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), -100)
    attention = torch.zeros(rows, width, dtype=torch.long)
    for i, (prompt, *responses) in enumerate(SHAPES):
        for half, length in enumerate(responses):
            row, end = half * len(SHAPES) + i, prompt + length
            ids[row, :end] = torch.randint(VOCAB, (end,), generator=g)
            if i == GREEDY_PAIR:  # token t is the argmax of the logits at t − 1
                ids[row, prompt:end] = policy[row, prompt - 1:end - 1].argmax(-1)
            labels[row, prompt:end] = ids[row, prompt:end]
            attention[row, :end] = 1
    return dict(input_ids=ids, attention_mask=attention, labels=labels), policy, reference


def _rows(batch, logits, pairs):
    """The sub-batch of `pairs` (chosen and rejected rows alike)."""
    half = len(logits) // 2
    index = torch.tensor(pairs + [half + i for i in pairs])
    return {k: v[index] for k, v in batch.items()}, logits[index]


def _fused_outputs(logits, labels):
    """What TRL's fused LM head returns for `logits` (`FusedCausalLMOutput`), in float32: each
    label's log-prob and log Σ_v p_v² (the WPO input), 0 where the label is −100."""
    shifted = labels[:, 1:]
    mask = shifted != -100
    logp = logits[:, :-1].float().log_softmax(-1)
    log_probs = logp.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    log_sum_sq = torch.logsumexp(2 * logp, -1).detach() * mask
    zeros = torch.zeros_like(log_probs)
    return SimpleNamespace(log_probs=log_probs, log_sum_sq_probs=log_sum_sq, entropy=zeros,
                           mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None)


class _Model(nn.Module):
    """Our side: `concatenated_forward` (full-logits path) reads `.logits`. TRL's side: called with
    `fused_lm_head=True`, the per-token outputs of its fused head."""

    is_gradient_checkpointing = False

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids=None, labels=None, fused_lm_head=False, **_):
        return _fused_outputs(self.logits, labels) if fused_lm_head else SimpleNamespace(
            logits=self.logits)


def _trl(batch, policy, reference, *, loss_type, loss_weights=None, label_smoothing=0.0,
         f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, use_weighting=False,
         ld_alpha=None, discopop_tau=0.05):
    """TRL 1.16's `DPOTrainer._compute_loss` on this batch: (mean loss, metrics)."""
    stand_in = SimpleNamespace(
        model=_Model(policy), ref_model=_Model(reference), beta=BETA, loss_types=list(loss_type),
        loss_weights=loss_weights or [1.0] * len(loss_type), label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        use_weighting=use_weighting, ld_alpha=ld_alpha, precompute_ref_logps=False,
        aux_loss_enabled=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None,
                                                     discopop_tau=discopop_tau),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                    gather_for_metrics=lambda x: x, unwrap_model=lambda m: m),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  completion_mask=(batch["labels"] != -100).long())
    loss = DPOTrainer._compute_loss(stand_in, stand_in.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stand_in._metrics["train"].items()}


def _ours(batch, policy, reference, *, loss_type, alpha_ours=None, **options):
    """Our `dpo_step` on this batch, with the options of `_trl` (alpha_divergence's α given in the
    project's form: `alpha_ours`); bco_pair's δ is `dpo_step`'s default 0, TRL's form."""
    options.pop("discopop_tau", None)
    if alpha_ours is not None:
        options["f_alpha_divergence_coef"] = alpha_ours
    else:
        options.pop("f_alpha_divergence_coef", None)
    if not options.get("label_smoothing"):
        options.pop("label_smoothing", None)
    cfg = TrainConfig(model="tiny", dataset="none", chunked_logps=False, beta=BETA,
                      loss_type=list(loss_type), **options)
    accelerator = SimpleNamespace(autocast=contextlib.nullcontext)  # float32: no autocast
    return dpo_step(accelerator, cfg, _Model(policy), _Model(reference), batch)


def _compare(loss_type, pairs=None, *, per_pair=True, alpha_ours=None, **options):
    """Our per-pair losses and rewards against TRL's, pair by pair (a batch of one: TRL returns
    the mean), and the batch mean and its gradient in the policy's logits."""
    batch, policy, reference = _batch()
    pairs = list(range(len(SHAPES))) if pairs is None else pairs
    sub, pol = _rows(batch, policy, pairs)
    _, ref = _rows(batch, reference, pairs)
    pol = pol.clone().requires_grad_()
    ours = _ours(sub, pol, ref, loss_type=loss_type, alpha_ours=alpha_ours, **options)
    (grad_ours,) = torch.autograd.grad(ours.losses.mean(), pol)
    theirs, _ = _trl(sub, pol, ref, loss_type=loss_type, **options)
    (grad_theirs,) = torch.autograd.grad(theirs, pol)
    torch.testing.assert_close(ours.losses.mean(), theirs.detach(), **TOL)
    torch.testing.assert_close(grad_ours, grad_theirs, **TOL)
    if not per_pair:
        return ours
    for k in range(len(pairs)):
        one, pol_one = _rows(sub, pol.detach(), [k])
        _, ref_one = _rows(sub, ref, [k])
        loss, metrics = _trl(one, pol_one, ref_one, loss_type=loss_type, **options)
        torch.testing.assert_close(ours.losses[k], loss, **TOL)
        torch.testing.assert_close(ours.chosen_rewards[k].item(), metrics["rewards/chosen"], **TOL)
        torch.testing.assert_close(ours.rejected_rewards[k].item(), metrics["rewards/rejected"],
                                   **TOL)
    return ours


TYPES = ["sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
         "discopop", "sigmoid_norm"]


@pytest.mark.parametrize("loss_type", TYPES)
def test_each_loss_type_agrees_with_trl(loss_type):
    _compare([loss_type])


@pytest.mark.parametrize("loss_type, eps", [("robust", 0.1), ("exo_pair", 1e-3), ("exo_pair", 0.2),
                                            ("aot", 0.1), ("aot_unpaired", 0.1), ("aot", 0.0)])
def test_label_smoothed_losses_agree_with_trl(loss_type, eps):
    """aot sorts over the batch, so its pairs are compared through the batch mean only."""
    _compare([loss_type], per_pair=not loss_type.startswith("aot"), label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "discopop", "hinge"])
@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence"])
def test_f_divergences_agree_with_trl(loss_type, kind):
    eps = {"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
    _compare([loss_type], f_divergence_type=kind, label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "discopop", "hinge"])
@pytest.mark.parametrize("alpha", [0.3, 1.0, 1.7])
def test_alpha_divergence_agrees_with_trl_at_one_minus_alpha(loss_type, alpha):
    """The project's α (f-DPO's f'(u) = (1 − u^(−α))/α) is TRL 1.16's 1 − α (it computes
    (u^(a−1) − 1)/(a − 1)); α = 1 is the forward KL in both (TRL's a = 0)."""
    eps = {"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
    _compare([loss_type], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1 - alpha,
             alpha_ours=alpha, label_smoothing=eps)


def test_help_gives_the_trl_mapping_of_alpha_and_of_wpo():
    from dpo.config import _build_parser

    text = " ".join(_build_parser().format_help().split())
    assert "f'(u) = (1 - u^(-α))/α (1 = forward_kl); TRL 1.16's f_alpha_divergence_coef is 1 - α" \
        in text
    assert "clamped at 1 as in the WPO authors' code; TRL 1.16 does not clamp" in text


def test_alpha_divergence_differs_from_trl_without_the_mapping():
    batch, policy, reference = _batch()
    ours = _ours(batch, policy, reference, loss_type=["sigmoid"],
                 f_divergence_type="alpha_divergence", alpha_ours=0.3)
    theirs, _ = _trl(batch, policy, reference, loss_type=["sigmoid"],
                     f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    assert abs(ours.losses.mean().item() - theirs.item()) > 1e-3


def test_sft_agrees_with_trl_over_the_batch():
    """sft is the batch's token-mean NLL in both; TRL gives each pair the batch value, this
    trainer each pair its own share (−log π(y⁺_i)·B/N), so only the mean is compared."""
    _compare(["sft"], per_pair=False)


@pytest.mark.parametrize("types, weights", [(["sigmoid", "sft"], [1.0, 0.3]),
                                            (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
                                            (["apo_zero", "ipo"], [0.5, 2.0])])
def test_mixtures_agree_with_trl(types, weights):
    _compare(types, per_pair=False, loss_weights=weights)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence"])
def test_f_divergence_with_an_sft_term_agrees_with_trl(kind):
    """RPO under another divergence: sft reads no scores, so it is allowed beside the losses
    that do (TRL allows it too)."""
    _compare(["sigmoid", "sft"], per_pair=False, loss_weights=[1.0, 0.5], f_divergence_type=kind)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "bco_pair"])
def test_ld_dpo_agrees_with_trl(loss_type):
    """TRL 1.16 desensitises the reference's log-probs too, as this trainer does. (It also takes
    ipo and sigmoid_norm, refused here: they divide by the length already.)"""
    ours = _compare([loss_type], ld_alpha=0.4)
    plain = _compare([loss_type])
    assert not torch.allclose(ours.losses, plain.losses)


def test_ld_dpo_with_sft_agrees_with_trl():
    _compare(["sigmoid", "sft"], per_pair=False, loss_weights=[1.0, 0.5], ld_alpha=0.0)


def _weights():
    """WPO's pair weights of the batch, from our step."""
    batch, policy, reference = _batch()
    return _ours(batch, policy, reference, loss_type=["sigmoid"], use_weighting=True).weights


BELOW_ONE = [0, 1, 2]  # the pairs whose WPO weight is below 1 (checked)


@pytest.mark.parametrize("types, ld_alpha", [(["sigmoid"], None), (["robust"], None),
                                             (["sigmoid", "apo_zero"], 0.5)])
def test_wpo_agrees_with_trl_where_no_weight_exceeds_one(types, ld_alpha):
    assert (_weights()[BELOW_ONE] < 1).all()
    _compare(types, BELOW_ONE, per_pair=len(types) == 1, use_weighting=True, ld_alpha=ld_alpha,
             loss_weights=[1.0, 0.5][:len(types)],
             label_smoothing=0.1 if types == ["robust"] else 0.0)


def test_wpo_weight_above_one_is_clamped_here_and_not_in_trl():
    """The greedy pair's weight w exceeds 1: TRL 1.16 multiplies its loss by w, this trainer (and
    the WPO authors' code) by min(1, w). TRL's own ratio of weighted to unweighted loss is w."""
    batch, policy, reference = _batch()
    one, pol = _rows(batch, policy, [GREEDY_PAIR])
    _, ref = _rows(batch, reference, [GREEDY_PAIR])
    weighted, _ = _trl(one, pol, ref, loss_type=["sigmoid"], use_weighting=True)
    plain, _ = _trl(one, pol, ref, loss_type=["sigmoid"])
    trl_weight = (weighted / plain).item()
    assert trl_weight > 1.5
    ours = _ours(one, pol, ref, loss_type=["sigmoid"], use_weighting=True)
    torch.testing.assert_close(ours.weights.item(), 1.0)
    torch.testing.assert_close(ours.losses[0], plain, **TOL)


def test_wpo_with_hinge_or_sft_fails_in_trl():
    """TRL 1.16 weights each term in place (`per_sequence_loss *= ...`): hinge's relu output is
    then needed by its backward, and sft's term is an expanded scalar, so the backward (hinge) or
    the forward (sft) raises. Here both train; hinge's value agrees with TRL's, and an sft term is
    weighted pair by pair (`tests/test_loss_variants.py`)."""
    batch, policy, reference = _batch()
    sub, pol = _rows(batch, policy, BELOW_ONE)
    _, ref = _rows(batch, reference, BELOW_ONE)
    pol = pol.clone().requires_grad_()
    theirs, _ = _trl(sub, pol, ref, loss_type=["hinge"], use_weighting=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        theirs.backward()
    ours = _ours(sub, pol, ref, loss_type=["hinge"], use_weighting=True)
    torch.testing.assert_close(ours.losses.mean(), theirs.detach(), **TOL)
    ours.losses.mean().backward()
    with pytest.raises(RuntimeError, match="single memory location"):
        _trl(sub, pol, ref, loss_type=["sigmoid", "sft"], use_weighting=True)
    _ours(sub, pol, ref, loss_type=["sigmoid", "sft"], use_weighting=True).losses.mean().backward()


def test_cdpo_label_smoothing_is_not_in_trl_sigmoid():
    """TRL 1.16's sigmoid has no label smoothing (cDPO); this trainer keeps Mitchell's cDPO.
    With ε = 0 they agree (test_each_loss_type_agrees_with_trl)."""
    batch, policy, reference = _batch()
    ours = _ours(batch, policy, reference, loss_type=["sigmoid"], label_smoothing=0.1)
    smoothed, _ = _trl(batch, policy, reference, loss_type=["sigmoid"], label_smoothing=0.1)
    plain, _ = _trl(batch, policy, reference, loss_type=["sigmoid"])
    torch.testing.assert_close(smoothed, plain, rtol=0, atol=0)
    assert abs(ours.losses.mean().item() - plain.item()) > 1e-3


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_per_token_losses_are_refused_with_an_f_divergence(loss_type):
    """TRL 1.16 divides f'(u) by the length; only the log-ratio is a sum over tokens."""
    with pytest.raises(ConfigError, match="not a sum over tokens"):
        TrainConfig(model="tiny", dataset="none", loss_type=[loss_type],
                    f_divergence_type="forward_kl")


def test_simpo_agrees_with_trl_cpo():
    """SimPO is TRL's `CPOTrainer` (trl.experimental.cpo) with loss_type simpo: its `cpo_loss`
    on the length-normalised log-probs."""
    batch, policy, reference = _batch()
    gamma = 0.3
    cfg = dict(simpo_gamma=gamma)
    ours = _ours(batch, policy, reference, loss_type=["simpo"], **cfg)
    out = ours.policy
    stand_in = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=BETA,
                               label_smoothing=0.0,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen, rejected = CPOTrainer.cpo_loss(
        stand_in, out.chosen_logps / out.chosen_lengths, out.rejected_logps / out.rejected_lengths)
    torch.testing.assert_close(ours.losses, losses, **TOL)
    torch.testing.assert_close(ours.chosen_rewards, chosen, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, rejected, **TOL)


def _trl_orpo(batch, logits, *, prompt_in_nll=False):
    """TRL 1.16's `ORPOTrainer.get_batch_loss_metrics` on this batch: (loss, metrics). TRL's NLL
    reads every token its attention mask keeps, prompt included; the stand-in model ignores the
    mask, so masking the prompt out (the default here) leaves its NLL on the responses alone,
    the tokens this trainer's reads, and changes nothing else."""
    half = len(logits) // 2
    mask = (batch["labels"] != -100).long() if not prompt_in_nll else batch["attention_mask"]
    sides = {"chosen": slice(0, half), "rejected": slice(half, None)}
    trl_batch = {f"{side}_{key}": value[rows] for side, rows in sides.items()
                 for key, value in (("input_ids", batch["input_ids"]),
                                    ("attention_mask", mask), ("labels", batch["labels"]))}
    stand_in = SimpleNamespace(
        beta=BETA, is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False,
        concatenated_inputs=ORPOTrainer.concatenated_inputs,
        get_batch_logps=ORPOTrainer.get_batch_logps,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x))
    stand_in.concatenated_forward = lambda *a: ORPOTrainer.concatenated_forward(stand_in, *a)
    stand_in.odds_ratio_loss = lambda *a: ORPOTrainer.odds_ratio_loss(stand_in, *a)
    return ORPOTrainer.get_batch_loss_metrics(stand_in, _Model(logits), trl_batch)


def _ours_orpo(batch, logits):
    """Our `dpo_step` with loss_type orpo, as train.py runs it: no reference model."""
    cfg = TrainConfig(model="tiny", dataset="none", chunked_logps=False, beta=BETA,
                      loss_type=["orpo"])
    accelerator = SimpleNamespace(autocast=contextlib.nullcontext)
    return dpo_step(accelerator, cfg, _Model(logits), None, batch), cfg


def test_orpo_agrees_with_trl():
    """ORPO: the batch loss (token-mean NLL − λ·mean log σ(log odds)) and its gradient in the
    policy's logits, and the log odds metrics under TRL's names, to 1e-6; pair by pair (a batch
    of one: the NLL's share of a pair in a batch is its part of the batch's token mean, as for
    sft), the loss and the rewards (β·ā)."""
    batch, policy, _ = _batch()
    pol = policy.clone().requires_grad_()
    ours, cfg = _ours_orpo(batch, pol)
    (grad_ours,) = torch.autograd.grad(ours.losses.mean(), pol)
    theirs, metrics = _trl_orpo(batch, pol)
    (grad_theirs,) = torch.autograd.grad(theirs, pol)
    torch.testing.assert_close(ours.losses.mean(), theirs.detach(), **TOL)
    torch.testing.assert_close(grad_ours, grad_theirs, **TOL)
    logged = dict(zip(pair_keys(cfg), pair_stats(ours).mean(0).tolist()))
    for key in ("log_odds_chosen", "log_odds_ratio", "rewards/chosen", "rewards/rejected"):
        assert logged[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-6), key
    for k in range(len(SHAPES)):
        one, pol_one = _rows(batch, policy, [k])
        loss, metrics = _trl_orpo(one, pol_one)
        torch.testing.assert_close(_ours_orpo(one, pol_one)[0].losses[0], loss, **TOL)
        torch.testing.assert_close(ours.chosen_rewards[k].item(), metrics["rewards/chosen"], **TOL)
        torch.testing.assert_close(ours.rejected_rewards[k].item(), metrics["rewards/rejected"],
                                   **TOL)


def test_orpo_nll_reads_the_responses_and_trls_the_prompts_too():
    """TRL 1.16's ORPO NLL is over the prompt and the response (`concatenated_forward`); this
    trainer's, like `sft` and the paper's L_SFT, over the response only: the two differ by the
    prompt tokens' share."""
    batch, policy, _ = _batch()
    ours, _ = _ours_orpo(batch, policy)
    response_only, _ = _trl_orpo(batch, policy)
    with_prompt, _ = _trl_orpo(batch, policy, prompt_in_nll=True)
    torch.testing.assert_close(ours.losses.mean(), response_only, **TOL)
    assert abs(with_prompt.item() - response_only.item()) > 1e-2


def test_orpo_log_odds_are_trls_and_finite_where_trls_are_not():
    """log(1 − e^ā) equals TRL's `log1mexp` to 1e-6 where that is finite, with a finite gradient
    where TRL's is nan (ā > −3e-8: e^ā rounds to 1 in the branch its `where` discards); at ā = 0
    TRL's value is −inf (and a log odds ratio of ±inf or nan), this trainer's log(tiny)."""
    a = torch.tensor([-200.0, -30.0, -5.0, -0.7, -0.6931472, -0.5, -1e-3, -1e-6, -1e-9, -1e-30])
    torch.testing.assert_close(log1mexp(a), trl_log1mexp(a), **TOL)
    for value in (-1e-9, 0.0):
        x = torch.tensor([value], requires_grad=True)
        trl_log1mexp(x).sum().backward()
        assert x.grad.isnan().all()
        x.grad = None
        log1mexp(x).sum().backward()
        assert x.grad.isfinite().all()
    assert trl_log1mexp(torch.tensor(0.0)) == -math.inf
    assert log1mexp(torch.tensor(0.0)) == pytest.approx(math.log(torch.finfo(torch.float32).tiny))
    zero, rejected = torch.zeros(1), torch.tensor([-1.0])
    stand_in = SimpleNamespace(beta=BETA, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, *_ = ORPOTrainer.odds_ratio_loss(stand_in, rejected, zero)  # y⁻ certain
    assert losses.isinf().all()
    ones = torch.ones(1)
    ours, _, _ = dpo_loss(rejected, zero, None, None, beta=BETA, loss_type="orpo",
                          chosen_lengths=ones, rejected_lengths=ones)
    assert ours.isfinite().all()


def test_the_stand_in_head_is_trls_fused_head():
    """The per-token outputs given to TRL are what its own fused head (`ChunkedLogProbFunction`,
    float32 accumulators) computes from the same logits, to float32 rounding."""
    batch, policy, _ = _batch()
    want = _fused_outputs(policy, batch["labels"])
    shifted = batch["labels"][:, 1:]
    mask = shifted != -100
    hidden = policy[:, :-1][mask].float()
    got = ChunkedLogProbFunction.apply(hidden, torch.eye(VOCAB), None, shifted[mask], 1.0, 4,
                                       None, 1.0, ("log_sum_sq_probs",))
    torch.testing.assert_close(got[0], want.log_probs[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2], want.log_sum_sq_probs[mask], rtol=0, atol=1e-5)
    assert math.isfinite(want.log_probs.sum().item())
