"""Train metrics between two logs: means per pair, and the gradient norm over updating steps."""
import json
import math

import pytest
import torch
from accelerate import Accelerator

from dpo.train.metrics import PAIR_KEYS, TrainMetrics


def test_grad_norm_is_the_mean_over_steps_that_updated():
    """Norms 1.0, inf (a step the fp16 loss scaler skipped) and 3.0 log grad_norm 2.0 — a
    finite number that JSON can carry; a window of skipped steps only logs no grad_norm."""
    metrics = TrainMetrics(torch.device("cpu"))
    metrics.add_batch(torch.ones(2, len(PAIR_KEYS)), torch.ones(4, 3))
    for norm in (1.0, math.inf, 3.0):
        metrics.add_grad_norm(torch.tensor(norm))
    values = metrics.compute(Accelerator(cpu=True), seconds=1.0)
    assert values["grad_norm"] == 2.0
    json.loads(json.dumps(values), parse_constant=lambda c: 1 / 0)  # no Infinity, no NaN
    metrics.add_grad_norm(torch.tensor(math.inf))
    assert "grad_norm" not in metrics.compute(Accelerator(cpu=True), seconds=1.0)


def test_padding_fraction_is_the_share_of_positions_without_a_real_token():
    """Over all batches since the last log: 2 of 8 positions padded, then a packed row of 4
    real tokens: 2 of 12. The logged real tokens are the same 10 however they were laid out."""
    metrics = TrainMetrics(torch.device("cpu"))
    stats = torch.ones(1, len(PAIR_KEYS))
    metrics.add_batch(stats, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]]))
    metrics.add_batch(stats, torch.ones(1, 4, dtype=torch.long))
    values = metrics.compute(Accelerator(cpu=True), seconds=1.0)
    assert values["padding_fraction"] == pytest.approx(2 / 12)
    assert values["tokens_per_sec"] == 10.0
    metrics.add_batch(stats, torch.ones(1, 7, dtype=torch.long))
    assert metrics.compute(Accelerator(cpu=True), seconds=1.0)["padding_fraction"] == 0.0


def test_kto_statistics_are_means_over_their_class():
    """KTO's rows: rewards 1.0 and 3.0 on desirable rows, −2.0 on the undesirable one; logged
    over two batches: rewards/chosen 2.0 (not 4/3 over all rows), rewards/rejected −2.0, the
    margin 4.0, kl and loss over all rows; eval's per-dataset prefixes alike. A class without
    rows logs no statistics of its own."""
    from types import SimpleNamespace

    from dpo.train.metrics import UNPAIRED_KEYS, class_means, pair_keys, pair_stats

    def stats(rewards, labels, kl):
        labels = torch.tensor(labels)
        policy = SimpleNamespace(chosen_logps=torch.tensor(rewards) * 10,
                                 chosen_logits_mean=torch.zeros(len(labels)))
        out = SimpleNamespace(chosen_rewards=torch.tensor(rewards), rejected_rewards=None,
                              policy=policy, losses=torch.full((len(labels),), 0.5), terms={},
                              labels=labels, kl=torch.tensor(kl), aux_loss=None, weights=None)
        return pair_stats(out)

    cfg = SimpleNamespace(loss_type=["kto"], router_aux_loss_coef=0.0, use_weighting=False)
    assert pair_keys(cfg) == UNPAIRED_KEYS
    metrics = TrainMetrics(torch.device("cpu"), UNPAIRED_KEYS)
    metrics.add_batch(stats([1.0, -2.0], [True, False], 0.2), torch.ones(4, 3))
    metrics.add_batch(stats([3.0], [True], 0.5), torch.ones(2, 3))
    values = metrics.compute(Accelerator(cpu=True), seconds=1.0)
    assert values["rewards/chosen"] == pytest.approx(2.0)
    assert values["rewards/rejected"] == pytest.approx(-2.0)
    assert values["rewards/margins"] == pytest.approx(4.0)
    assert values["logps/chosen"] == pytest.approx(20.0)
    assert values["kl"] == pytest.approx(0.3) and values["desirable"] == pytest.approx(2 / 3)
    evals = class_means({"eval/desirable": 1.0, "eval/rewards/chosen": 2.0,
                         "eval/rewards/rejected": 0.0, "eval/a/desirable": 0.5,
                         "eval/a/rewards/chosen": 1.0, "eval/a/rewards/rejected": -1.0})
    assert evals["eval/rewards/chosen"] == 2.0 and "eval/rewards/rejected" not in evals
    assert "eval/rewards/margins" not in evals
    assert evals["eval/a/rewards/chosen"] == 2.0 and evals["eval/a/rewards/margins"] == 4.0


def test_ranking_metrics_compare_adjacent_ranks_or_the_best():
    """Row 0, a full ranking of 3 with rewards (0.5, 0.7, −0.5): pairs (1, 2) wrong by −0.2
    and (2, 3) right by 1.2; row 1, the best of 3 over an unordered list, rewards (0.3, 0.1,
    0.4): pairs (1, 2) right by 0.2 and (1, 3) wrong by −0.1. `rejected` is the mean over
    ranks 2.., accuracy the share of pairs right, margin their mean."""
    from types import SimpleNamespace

    from dpo.train.metrics import pair_stats
    from dpo.train.step import StepOutput

    rewards = torch.tensor([[0.5, 0.7, -0.5], [0.3, 0.1, 0.4]])
    logps = torch.tensor([[-1.0, -2.0, -4.0], [-3.0, -5.0, -6.0]])
    policy = SimpleNamespace(slot_logps=logps, slot_logits_mean=logps / 10)
    out = StepOutput(policy, torch.tensor([1.0, 2.0]), rewards[:, 0], rewards[:, 1], {},
                     slot_rewards=rewards, ranking_mask=torch.ones(2, 3, dtype=torch.bool),
                     stages=torch.tensor([2, 1]))
    stats = dict(zip(PAIR_KEYS, pair_stats(out).T))
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor([0.5, 0.3]))
    torch.testing.assert_close(stats["rewards/rejected"], torch.tensor([0.1, 0.25]))
    torch.testing.assert_close(stats["rewards/accuracies"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(stats["rewards/margins"], torch.tensor([0.5, 0.05]))
    torch.testing.assert_close(stats["logps/rejected"], torch.tensor([-3.0, -5.5]))
