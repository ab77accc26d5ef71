"""KTO (dpo/loss/unpaired.py) by hand, by its properties, and against TRL 1.16's `KTOTrainer`.

Three unpaired rows, β = 0.5, the reference point z₀ = 0.4 (summed log-probs):

    row  label        log π(y)  log π_ref(y)  r = log π − log π_ref   β·(r − z₀)
     1   desirable      −10         −11              +1                  +0.3
     2   undesirable     −5          −5               0                  −0.2
     3   undesirable    −12         −11              −1                  −0.7

desirable: 1 − σ(β(r − z₀)); undesirable: 1 − σ(β(z₀ − r)). σ(0.3) = 0.57444252,
σ(0.2) = 0.54983400, σ(0.7) = 0.66818777.
"""
import contextlib
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dpo.loss import dpo_loss

BETA, KL = 0.5, 0.4
PI = torch.tensor([-10.0, -5.0, -12.0])
REF = torch.tensor([-11.0, -5.0, -11.0])
LABELS = torch.tensor([True, False, False])
# The mismatched completions' log-probs: they only reach the loss through z₀.
PI_KL, REF_KL = torch.tensor([-9.0, -7.0, -8.0]), torch.tensor([-9.5, -7.0, -8.5])


def kto(pi=PI, ref=REF, labels=LABELS, kl=KL, **kw):
    return dpo_loss(pi, PI_KL, ref, REF_KL, beta=BETA, loss_type="kto", labels=labels, kl=kl,
                    **kw)


def test_kto_hand_computed():
    losses, chosen_r, _ = kto()
    torch.testing.assert_close(losses, torch.tensor([1 - 0.57444252, 1 - 0.54983400,
                                                     1 - 0.66818777]))
    torch.testing.assert_close(chosen_r, torch.tensor([0.5, 0.0, -0.5]))  # β·r, detached
    assert not chosen_r.requires_grad


def test_class_weights_scale_their_rows():
    """λ_D = 2, λ_U = 0.5: row 1 doubles, rows 2 and 3 halve."""
    plain, _, _ = kto()
    weighted, _, _ = kto(desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(weighted, plain * torch.tensor([2.0, 0.5, 0.5]))


def test_policy_equal_to_reference_costs_one_half_per_row():
    """π = π_ref: r = 0 and z₀ = 0, so every row's loss is 1 − σ(0) = 1/2 — KTO's ln 2."""
    losses, _, _ = kto(ref=PI, kl=0.0)
    torch.testing.assert_close(losses, torch.full((3,), 0.5))


def test_gradient_raises_desirable_and_lowers_undesirable():
    """A descent step moves log π(y) up for a desirable completion, down for an undesirable
    one."""
    pi = PI.clone().requires_grad_()
    kto(pi=pi)[0].sum().backward()
    assert pi.grad[0] < 0 and (pi.grad[1:] > 0).all()


def test_kl_reference_point_raises_the_bar():
    """A larger z₀ makes a desirable completion's loss larger and an undesirable one's smaller."""
    low, high = kto(kl=0.0)[0], kto(kl=1.0)[0]
    assert high[0] > low[0] and (high[1:] < low[1:]).all()


def test_labels_are_required_and_boolean():
    with pytest.raises(ValueError, match="labels is required: loss_type kto trains on labelled"):
        kto(labels=None)
    with pytest.raises(ValueError, match="labels must be a bool tensor"):
        kto(labels=LABELS.long())
    with pytest.raises(ValueError, match="labels has shape"):
        kto(labels=LABELS[:2])


# ------------------------------------------------------------------------------------------
# Against TRL 1.16's KTOTrainer._compute_loss
# ------------------------------------------------------------------------------------------

trl = pytest.importorskip("trl", reason="trl (the `test` extra) is the reference implementation "
                          "this parity test runs; the trainer itself never imports it")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from dpo.config import TrainConfig  # noqa: E402
from dpo.data.batching import PreferenceCollator  # noqa: E402
from dpo.train.step import dpo_step  # noqa: E402
from tests.test_loss_trl import _fused_outputs  # noqa: E402

VOCAB = 7
# (prompt, completion) token counts and labels of each row
ROWS = [(3, 5, True), (2, 3, False), (4, 4, True), (1, 6, False), (2, 2, False)]


def _unpaired_batch(seed):
    """Our collated `[completions; mismatched]` batch of `ROWS` (the collator rotates the
    completions) and the two models' logits over it, `[2B, T, V]`."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for prompt, completion, label in ROWS:
        ids = torch.randint(1, VOCAB, (prompt + completion,), generator=g).tolist()
        labels = [-100] * prompt + ids[prompt:]
        rows.append({"chosen_input_ids": ids, "chosen_labels": labels, "rejected_input_ids": ids,
                     "rejected_labels": labels, "label": label})
    batch = PreferenceCollator(0)(rows)
    shape = (*batch["input_ids"].shape, VOCAB)
    policy = torch.randn(shape, generator=g) * 1.5
    reference = policy + 0.7 * torch.randn(shape, generator=g)
    return batch, policy, reference


class _Model(nn.Module):
    """Both sides' stand-in model: ours reads full `.logits` of the whole batch; TRL calls it on
    the completions and on the mismatched rows separately (`fused_lm_head=True`)."""

    is_gradient_checkpointing = False
    training = True

    def __init__(self, logits, by_input):
        super().__init__()
        self.logits, self.by_input = logits, by_input

    def forward(self, input_ids=None, labels=None, fused_lm_head=False, **_):
        if not fused_lm_head:
            return SimpleNamespace(logits=self.logits)
        return _fused_outputs(self.logits[self.by_input[id(input_ids)]], labels)


def _trl(batch, policy, reference, desirable_weight, undesirable_weight):
    b = len(batch["label"])
    completion_mask = (batch["labels"] != -100).long()
    inputs = dict(input_ids=batch["input_ids"][:b], attention_mask=batch["attention_mask"][:b],
                  completion_mask=completion_mask[:b], KL_input_ids=batch["input_ids"][b:],
                  KL_attention_mask=batch["attention_mask"][b:],
                  KL_completion_mask=completion_mask[b:], label=batch["label"].clone())
    by_input = {id(inputs["input_ids"]): slice(0, b), id(inputs["KL_input_ids"]): slice(b, None)}
    stand_in = SimpleNamespace(
        model=_Model(policy, by_input), ref_model=_Model(reference, by_input), beta=BETA,
        loss_type="kto", desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        calculate_KL=True, precompute_ref_logps=False, aux_loss_enabled=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                    unwrap_model=lambda m: m),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    stand_in._compute_kl_logps = lambda model, b_: KTOTrainer._compute_kl_logps(stand_in, model, b_)
    loss = KTOTrainer._compute_loss(stand_in, stand_in.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stand_in._metrics["train"].items()}


@pytest.mark.parametrize("seed, weights, swap", [(0, (1.0, 1.0), False), (1, (1.0, 1.0), True),
                                                 (2, (1.33, 0.8), False)])
def test_kto_agrees_with_trl(seed, weights, swap):
    """Loss, its gradient in the policy's logits, the KL estimate and the class rewards, to 1e-6:
    with z₀ > 0, and clamped at 0 (`swap`: policy and reference exchanged, which flips the
    estimate's sign)."""
    batch, policy, reference = _unpaired_batch(seed)
    if swap:
        policy, reference = reference, policy
    cfg = TrainConfig(model="tiny", dataset="none", chunked_logps=False, beta=BETA,
                      loss_type=["kto"], desirable_weight=weights[0],
                      undesirable_weight=weights[1])
    accelerator = SimpleNamespace(autocast=contextlib.nullcontext, reduce=lambda x, reduction: x)
    pol = policy.clone().requires_grad_()
    ours = dpo_step(accelerator, cfg, _Model(pol, {}), _Model(reference, {}), batch)
    (grad_ours,) = torch.autograd.grad(ours.losses.mean(), pol)
    pol = policy.clone().requires_grad_()
    theirs, metrics = _trl(batch, pol, reference, *weights)
    (grad_theirs,) = torch.autograd.grad(theirs, pol)
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.losses.mean(), theirs.detach(), **tol)
    torch.testing.assert_close(grad_ours, grad_theirs, **tol)
    torch.testing.assert_close(ours.kl.item(), metrics["kl"], **tol)
    labels = batch["label"]
    torch.testing.assert_close(ours.chosen_rewards[labels].mean().item(),
                               metrics["rewards/chosen"], **tol)
    torch.testing.assert_close(ours.chosen_rewards[~labels].mean().item(),
                               metrics["rewards/rejected"], **tol)
    assert (ours.kl.item() == 0) == swap
