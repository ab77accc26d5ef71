"""The per-step denominators of the RPO term, counted from the tokenized pairs; WPO's weights
and LD-DPO's log-probs in the step."""
import copy
import math

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset

from dpo.config import TrainConfig
from dpo.train.metrics import pair_keys, pair_stats
from dpo.train.step import chosen_token_counts, dpo_step, sft_num_tokens
from dpo.demo.tiny import tiny_qwen3
from tests.test_forward import VOCAB, _pair_batch

LABELS = [[-100, -100, 5, 6, 7], [-100, 1, 2], [-100, 9], [3, 4, -100, 5]]


def test_chosen_token_counts_skip_prompt_and_position_zero():
    """Counts of labels ≠ −100 after the causal shift: 3, 2, 1, and 2 (position 0's label 3 is
    never predicted); a select() (indices mapping, or a contiguous slice) is honoured."""
    ds = Dataset.from_dict({"chosen_labels": LABELS})
    assert chosen_token_counts(ds).tolist() == [3, 2, 1, 2]
    assert chosen_token_counts(ds.select([3, 0])).tolist() == [2, 3]
    assert chosen_token_counts(ds.select(range(1, 3))).tolist() == [2, 1]


def test_sft_num_tokens_per_step():
    """Steps {0, 1} and {2, 3} of 2 micro-batches: (3 + 2) / 2 and (1 + 2) / 2."""
    counts = np.array([3, 2, 1, 2])
    assert sft_num_tokens([[0, 1], [2, 3]], counts, micro_batches=2) == [2.5, 1.5]


# --- WPO and LD-DPO in the step ----------------------------------------------------------------

def _step_setup(**options):
    reference = tiny_qwen3(VOCAB, seed=0).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy a little off the reference: non-zero margins
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    cfg = TrainConfig(model="tiny", dataset="none", logps_chunk_size=4, **options)
    return Accelerator(cpu=True), cfg, policy, reference, _pair_batch()


def test_ld_at_step_zero_is_ln2_because_the_reference_is_desensitised_too():
    """Policy = reference: with LD-DPO on both, Δ = 0, every loss is ln 2 and every reward 0. With
    the policy's log-probs alone desensitised, pair 0's rejected and pair 1's chosen response
    (the longer ones) would carry −(1 − α)·Σ_{t > ℓ_p} log π_ref of their excess tokens."""
    accelerator, cfg, _, reference, batch = _step_setup(ld_alpha=0.5)
    out = dpo_step(accelerator, cfg, reference, reference, batch)
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2)), rtol=0, atol=0)
    assert torch.equal(out.chosen_rewards, torch.zeros(2))


def test_ld_alpha_one_is_plain_dpo_exactly():
    accelerator, cfg, policy, reference, batch = _step_setup()
    plain = dpo_step(accelerator, cfg, policy, reference, batch)
    _, cfg_ld, _, _, _ = _step_setup(ld_alpha=1.0)
    ld = dpo_step(accelerator, cfg_ld, policy, reference, batch)
    assert (plain.chosen_rewards != 0).all()
    assert torch.equal(ld.losses, plain.losses)
    assert torch.equal(ld.chosen_rewards, plain.chosen_rewards)
    _, cfg_half, _, _, _ = _step_setup(ld_alpha=0.5)
    assert not torch.equal(dpo_step(accelerator, cfg_half, policy, reference, batch).losses,
                           plain.losses)


def test_weighting_multiplies_each_pair_loss_by_its_policy_weight():
    """losses = min(1, w⁺·w⁻)·(plain losses), the weights from the policy's forward (logged as
    `weights/mean`), and the gradient is the weighted one: the weight is a constant."""
    accelerator, cfg, policy, reference, batch = _step_setup()
    plain = dpo_step(accelerator, cfg, policy, reference, batch)
    _, cfg_w, _, _, _ = _step_setup(use_weighting=True)
    out = dpo_step(accelerator, cfg_w, policy, reference, batch)
    want = torch.exp(out.policy.chosen_log_weights + out.policy.rejected_log_weights).clamp(max=1)
    assert (want < 1).all() and (want > 0).all()
    torch.testing.assert_close(out.weights, want)
    torch.testing.assert_close(out.losses, want * plain.losses)
    assert pair_keys(cfg_w)[-1] == "weights/mean"
    torch.testing.assert_close(pair_stats(out)[:, -1], want)
    out.losses.sum().backward()
    grad = policy.lm_head.weight.grad.clone()
    policy.zero_grad()
    (want * dpo_step(accelerator, cfg, policy, reference, batch).losses).sum().backward()
    torch.testing.assert_close(grad, policy.lm_head.weight.grad)


def test_kto_kl_is_the_mean_log_ratio_over_every_process_rows_clamped_at_zero():
    """Two processes' rows, 2 and 1 (a lone last batch): the mean over the 3 rows, (1 + 2 + 6)/3
    = 3 — not the mean of the processes' means, 3.75 — and 0 where the estimate is negative."""
    from types import SimpleNamespace

    from dpo.train.step import kto_kl

    other = torch.tensor([6.0, 1.0])  # the other process's (sum, rows)
    two = SimpleNamespace(reduce=lambda t, reduction: t + other)
    kl = kto_kl(two, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    assert kl.item() == 3.0 and not kl.requires_grad
    one = SimpleNamespace(reduce=lambda t, reduction: t)
    assert kto_kl(one, torch.tensor([-1.0, 0.5]), torch.tensor([0.0, 0.0])).item() == 0.0


# --- rankings in the step ----------------------------------------------------------------------

def _as_ranked(batch: dict, stages: int) -> dict:
    """A pair batch with the ranking columns: rankings of two responses, same tensors."""
    rows = batch["input_ids"].shape[0] // 2
    return {**batch, "ranking_mask": torch.ones(rows, 2, dtype=torch.bool),
            "stages": torch.full((rows,), stages)}


def test_pairs_laid_out_as_rankings_are_dpo_bit_for_bit():
    """Both ranking losses on rankings of two responses: DPO's losses, rewards and metrics
    to the last bit (torch.equal), and the same gradients."""
    accelerator, cfg, policy, reference, batch = _step_setup()
    plain = dpo_step(accelerator, cfg, policy, reference, batch)
    plain.losses.mean().backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    for kind in ("plackett_luce", "all_pairs"):
        for stages in (1, 5):
            policy.zero_grad()
            cfg_r = TrainConfig(model="tiny", dataset="none", logps_chunk_size=4,
                                ranking_loss=kind)
            ranked = dpo_step(accelerator, cfg_r, policy, reference, _as_ranked(batch, stages))
            assert torch.equal(ranked.losses, plain.losses)
            assert torch.equal(ranked.chosen_rewards, plain.chosen_rewards)
            assert torch.equal(ranked.rejected_rewards, plain.rejected_rewards)
            assert torch.equal(pair_stats(ranked), pair_stats(plain))
            ranked.losses.mean().backward()
            assert all(torch.equal(p.grad, g) for p, g in zip(policy.parameters(), grads))
