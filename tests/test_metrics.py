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
