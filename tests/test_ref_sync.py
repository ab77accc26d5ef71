"""TR-DPO's reference updates (dpo/train/ref_sync.py) on one process: the soft and the hard update
by their formula, only at sync steps, and the reference's weights through a checkpoint."""
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from dpo.train.ref_sync import ReferenceSync
from dpo.demo.tiny import tiny_qwen3


def _sync(alpha, every=2):
    policy, reference = tiny_qwen3(64, seed=1), tiny_qwen3(64, seed=2)
    cfg = SimpleNamespace(ref_model_mixup_alpha=alpha, ref_model_sync_steps=every)
    return policy, reference, ReferenceSync(Accelerator(cpu=True), cfg, policy, reference)


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_soft_update_at_sync_steps_only():
    """α = 0.25, every 2 steps: step 1 leaves the reference alone; step 2 makes it
    0.25·θ_π + 0.75·θ_ref, parameter by parameter."""
    policy, reference, sync = _sync(0.25)
    before, target = _weights(reference), _weights(policy)
    assert any(not torch.equal(before[n], target[n]) for n in before)
    sync.end_step(1)
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())
    sync.end_step(2)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(p, 0.25 * target[name] + 0.75 * before[name])


def test_hard_update_copies_the_policy():
    policy, reference, sync = _sync(1.0, every=1)
    sync.end_step(1)
    assert all(torch.equal(p, dict(policy.named_parameters())[n])
               for n, p in reference.named_parameters())


def test_the_synced_reference_goes_through_a_checkpoint():
    policy, reference, sync = _sync(0.5)
    sync.end_step(2)
    state = sync.state_dict()
    _, fresh, other = _sync(0.5)
    other.load_state_dict(state)
    assert all(torch.equal(p, dict(reference.named_parameters())[n])
               for n, p in fresh.named_parameters())


def test_a_reference_of_another_architecture_is_refused():
    import pytest

    from dpo.config import ConfigError

    cfg = SimpleNamespace(ref_model_mixup_alpha=0.5, ref_model_sync_steps=1)
    with pytest.raises(ConfigError, match="not the policy's architecture"):
        ReferenceSync(Accelerator(cpu=True), cfg, tiny_qwen3(64), tiny_qwen3(64, num_layers=1))
