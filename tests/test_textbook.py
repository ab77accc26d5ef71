"""The training step is the textbook step (`dpo.textbook`), only faster: loss, per-pair log-probs,
rewards and every parameter's gradient to 1e-5 relative, on four architectures, padded and
packed, full logits and chunked head, a precomputed reference, LoRA; and one optimizer step of
`train.py` ends at the weights of one textbook step with AdamW on the same pairs."""
import copy
import json
import math
import sys

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from safetensors.torch import load_file

from dpo.config import TrainConfig
from dpo.data.batching import PreferenceCollator
from dpo.reference_cache import precompute_reference_logps
from dpo.step import dpo_step
from dpo.textbook import textbook_dpo_step
from tests.e2e import demo_env, run_train, train_logs
from tests.test_forward_architectures import pair_batch, pair_rows, tiny_model

# Gemma-2 with its logit soft-capping (eager: sdpa refuses it), and Mistral with a 16-token
# sliding window, shorter than every sequence of `pair_batch` (19 to 40 tokens).
ARCHS = {"llama": "sdpa", "qwen3": "sdpa", "gemma2": "eager", "mistral/window": "sdpa"}
BETA = 0.1
RTOL = 1e-5


def perturbed(model, seed: int = 1):
    """A copy of `model` with every weight scaled by 1 ± ~10%: a policy that has moved away from
    its reference, so that rewards and margins are not zero and σ is not at ½."""
    generator = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    return other


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module", params=list(ARCHS))
def models(request):
    """(policy, frozen reference) of one architecture, built once for the module."""
    reference = tiny_model(request.param)
    reference.config._attn_implementation = ARCHS[request.param]
    policy = perturbed(reference).train()
    return request.param, policy, reference.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def rows():
    return pair_rows(pair_batch())


def textbook(policy, reference, rows):
    """The textbook step on the padded batch of `rows`, and the policy's gradients."""
    policy.zero_grad()
    step = textbook_dpo_step(policy, reference, PreferenceCollator(0)(rows), BETA)
    return step, grads_of(policy)


def optimised(accelerator, policy, reference, batch, **settings):
    """`dpo_step` as training runs it (mean loss, backward), and the policy's gradients."""
    cfg = TrainConfig(model="tiny", dataset="none", beta=BETA, logps_chunk_size=7, **settings)
    policy.zero_grad()
    out = dpo_step(accelerator, cfg, policy, reference, batch)
    out.losses.mean().backward()
    return out, grads_of(policy)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(got, got_grads, want, want_grads, where: str):
    assert want.losses.shape == (2,) and (want.chosen_rewards != 0).all()
    assert (want.losses - math.log(2)).abs().min() > 1e-3  # the policy has moved: σ is not ½
    logps = {"chosen_logps": (got.policy.chosen_logps, want.chosen_logps),
             "rejected_logps": (got.policy.rejected_logps, want.rejected_logps)}
    for name, (g, w) in logps.items():
        torch.testing.assert_close(g, w.detach(), rtol=RTOL, atol=0, msg=f"{where}: {name}")
    # Rewards and margins are differences of log-probs some 100× larger (here −450 vs 0.1/β):
    # float32 sums that agree to 1e-7 relative leave them ~1e-5 apart relative to themselves.
    # So they are held to 1e-5 of the log-probs they come from (the loss moves less: |L'| ≤ 1).
    size = BETA * max(t.detach().abs().max() for t in (want.chosen_logps, want.rejected_logps,
                                               want.ref_chosen_logps, want.ref_rejected_logps))
    derived = {"loss": (got.losses.mean(), want.loss), "losses": (got.losses, want.losses),
               "chosen_rewards": (got.chosen_rewards, want.chosen_rewards),
               "rejected_rewards": (got.rejected_rewards, want.rejected_rewards)}
    for name, (g, w) in derived.items():
        torch.testing.assert_close(g, w.detach(), rtol=RTOL, atol=2 * RTOL * float(size),
                                   msg=f"{where}: {name}")
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 5, where
    for name, w in want_grads.items():
        # Relative to the tensor's largest entry: an entry near 0 has no relative precision.
        scale = w.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(got_grads[name] / scale, w / scale, rtol=RTOL, atol=RTOL,
                                   msg=f"{where}: gradient of {name}")


@pytest.mark.parametrize("chunked", [False, True], ids=["full-logits", "chunked"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_training_step_equals_the_textbook(accelerator, models, rows, packed, chunked):
    """`dpo_step` on the reference model: padded (the attention mask dropped for the mask-free
    causal path) or packed (padding-free rows of at most 45 tokens: three rows, two ending in
    padding), on the full logits or the chunked head."""
    arch, policy, reference = models
    want, want_grads = textbook(policy, reference, rows)
    batch = PreferenceCollator(0, padding_free=packed, max_packed_tokens=45)(rows)
    assert ("packed_sequences" in batch) == packed
    got, got_grads = optimised(accelerator, policy, reference, batch, chunked_logps=chunked)
    assert_same_step(got, got_grads, want, want_grads, f"{arch}, packed={packed}, "
                     f"chunked={chunked}")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_precomputed_reference_equals_the_textbook(accelerator, models, rows, packed):
    """The reference's log-probs computed once by `dpo.reference_cache` and carried in the
    batch, no reference model in the step: the textbook's step, which runs the reference."""
    arch, policy, reference = models
    want, want_grads = textbook(policy, reference, rows)
    collate = PreferenceCollator(0, padding_free=packed, max_packed_tokens=45)
    cached = precompute_reference_logps(accelerator, reference, Dataset.from_list(rows), collate,
                                        batch_size=2, longest_first=False, chunked=True,
                                        chunk_size=7, cache_dir=None, cache_key_parts=None)
    batch = collate(list(cached))
    assert "ref_chosen_logps" in batch
    got, got_grads = optimised(accelerator, policy, None, batch)
    assert_same_step(got, got_grads, want, want_grads, f"{arch}, precomputed, packed={packed}")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_lora_step_equals_the_textbook(accelerator, models, rows, packed, tmp_path):
    """LoRA as train.py loads it (`load_policy_and_reference`: a rank-4 adapter on every linear
    layer, the reference a view of the policy with the adapter off), the adapter moved off zero:
    the textbook's step with the base model, loaded on its own, as the reference. Only the
    adapter's weights have gradients."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from dpo.lora import AdapterOffReference
    from dpo.models import load_policy_and_reference

    arch, _, base = models
    base.save_pretrained(tmp_path / "base")
    cfg = dict(lora_r=4, attn_implementation=ARCHS[arch], chunked_logps=True)
    policy, view = load_policy_and_reference(
        TrainConfig(model=str(tmp_path / "base"), output_dir=str(tmp_path / "out"), **cfg),
        str(tmp_path / "base"))
    assert isinstance(view, AdapterOffReference)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B is zero at init: give the adapter a direction of its own
        for name, p in policy.named_parameters():
            if "lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", attn_implementation=ARCHS[arch]).eval().requires_grad_(False)
    policy.train()
    want, want_grads = textbook(policy, reference, rows)
    batch = PreferenceCollator(0, padding_free=packed, max_packed_tokens=45)(rows)
    got, got_grads = optimised(accelerator, policy, view, batch, **cfg)
    assert want_grads and all("lora_" in name for name in want_grads)
    assert_same_step(got, got_grads, want, want_grads, f"{arch}, LoRA, packed={packed}")


# --- One optimizer step of train.py -----------------------------------------------------------

