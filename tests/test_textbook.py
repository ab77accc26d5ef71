"""The training step is the textbook step (`dpo.textbook`), only faster: loss, per-pair log-probs,
rewards and every parameter's gradient to 1e-5 relative, on four architectures, padded, packed
and with shared prompts, full logits and chunked head, a precomputed reference, LoRA, KTO,
rankings (Plackett–Luce); and one optimizer step of `train.py` ends at the weights of one
textbook step with AdamW on the same pairs."""
import copy
import math

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from safetensors.torch import load_file

from dpo.config import TrainConfig
from dpo.data.batching import PreferenceCollator
from dpo.train.reference_cache import precompute_reference_logps
from dpo.train.step import dpo_step
from dpo.textbook import (response_logps, textbook_dpo_step, textbook_kto_step,
                          textbook_plackett_luce_step)
from tests.e2e import demo_env, run_train, train_logs
from tests.test_forward import logps_row_by_row
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


def assert_same_step(got, got_grads, want, want_grads, where: str, rows: int = 2,
                     at_start: float = math.log(2)):
    """`rows`: pairs (or KTO's rows); `at_start`: each one's loss where the policy is the
    reference."""
    assert want.losses.shape == (rows,) and (want.chosen_rewards != 0).all()
    assert (want.losses - at_start).abs().min() > 1e-3  # the policy has moved: σ is not ½
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


def test_the_textbook_log_probs_are_each_response_alone(models):
    """The spec itself: log π(y|x) of each row of a padded batch is that of the row run alone,
    without its padding, summed over the response tokens only."""
    arch, policy, _ = models
    batch = pair_batch()
    with torch.no_grad():
        got = response_logps(policy, batch)
    torch.testing.assert_close(got, logps_row_by_row(policy, batch), rtol=RTOL, atol=0,
                               msg=arch)


# Collator settings: padded; packed (padding-free rows of at most 45 tokens: three rows, two
# ending in padding); each pair once as [prompt | chosen | rejected], a pair per row or packed.
LAYOUTS = {"padded": {}, "packed": {"padding_free": True, "max_packed_tokens": 45},
           "shared": {"share_prompt": True},
           "shared-packed": {"share_prompt": True, "padding_free": True, "max_packed_tokens": 45}}


@pytest.mark.parametrize("chunked", [False, True], ids=["full-logits", "chunked"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_step_equals_the_textbook(accelerator, models, rows, layout, chunked):
    """`dpo_step` on the reference model, on every batch layout (padded: the attention mask
    dropped for the mask-free causal path), on the full logits or the chunked head."""
    arch, policy, reference = models
    want, want_grads = textbook(policy, reference, rows)
    batch = PreferenceCollator(0, **LAYOUTS[layout])(rows)
    assert ("packed_sequences" in batch) == (layout == "packed")
    got, got_grads = optimised(accelerator, policy, reference, batch, chunked_logps=chunked)
    assert_same_step(got, got_grads, want, want_grads, f"{arch}, {layout}, chunked={chunked}")


def unpaired(rows):
    """The pairs' responses as KTO's rows: chosen desirable, rejected undesirable, in turn."""
    return [{"chosen_input_ids": row[f"{side}_input_ids"], "chosen_labels": row[f"{side}_labels"],
             "rejected_input_ids": row[f"{side}_input_ids"],
             "rejected_labels": row[f"{side}_labels"], "label": side == "chosen"}
            for row in rows for side in ("chosen", "rejected")]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kto_step_equals_the_textbook(accelerator, models, rows, layout):
    """KTO's `dpo_step`, rows and mismatched pairs in one forward (the textbook runs the pairs
    apart, without gradient), on every batch layout: loss, log-probs, rewards, gradients."""
    arch, policy, reference = models
    policy.zero_grad()
    want = textbook_kto_step(policy, reference, PreferenceCollator(0)(unpaired(rows)), BETA,
                             undesirable_weight=1.5)
    want_grads = grads_of(policy)
    batch = PreferenceCollator(0, **LAYOUTS[layout])(unpaired(rows))
    got, got_grads = optimised(accelerator, policy, reference, batch, loss_type=["kto"],
                               undesirable_weight=1.5, chunked_logps=True)
    kl = (want.rejected_logps - want.ref_rejected_logps).mean().clamp(min=0)
    torch.testing.assert_close(got.kl, kl, rtol=RTOL,
                               atol=RTOL * float(want.ref_rejected_logps.abs().max()))
    assert_same_step(got, got_grads, want, want_grads, f"{arch}, {layout}", rows=4,
                     at_start=0.5)


def ranked(rows):
    """Rankings from the pairs: pair 0 gains a third response, its chosen one read backwards
    (a full ranking, 2 stages); pair 1 stays a ranking of two, its best over the rest."""
    prompt = rows[0]["chosen_labels"].count(-100)
    ids = rows[0]["chosen_input_ids"]
    third = ids[:prompt] + ids[prompt:][::-1]
    return [{**rows[0], "more_input_ids": [third], "more_labels": [[-100] * prompt
                                                                  + third[prompt:]],
             "stages": 2},
            {**rows[1], "more_input_ids": [], "more_labels": [], "stages": 1}]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plackett_luce_step_equals_the_textbook(accelerator, models, rows, layout):
    """Rankings of 3 and 2 responses, on every batch layout (the shared one puts 3 responses
    after one prompt): loss, log-probs of ranks 1 and 2, rewards, gradients."""
    arch, policy, reference = models
    policy.zero_grad()
    want = textbook_plackett_luce_step(policy, reference, PreferenceCollator(0)(ranked(rows)),
                                       BETA)
    want_grads = grads_of(policy)
    batch = PreferenceCollator(0, **LAYOUTS[layout])(ranked(rows))
    got, got_grads = optimised(accelerator, policy, reference, batch, chunked_logps=True)
    assert_same_step(got, got_grads, want, want_grads, f"{arch}, {layout}",
                     at_start=math.log(6))


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_precomputed_reference_equals_the_textbook(accelerator, models, rows, layout):
    """The reference's log-probs computed once by `dpo.reference_cache` and carried in the
    batch, no reference model in the step: the textbook's step, which runs the reference."""
    arch, policy, reference = models
    want, want_grads = textbook(policy, reference, rows)
    collate = PreferenceCollator(0, **LAYOUTS[layout])
    cached = precompute_reference_logps(accelerator, reference, Dataset.from_list(rows), collate,
                                        batch_size=2, longest_first=False, chunked=True,
                                        chunk_size=7, cache_dir=None, cache_key_parts=None)
    batch = collate(list(cached))
    assert "ref_chosen_logps" in batch
    got, got_grads = optimised(accelerator, policy, None, batch)
    assert_same_step(got, got_grads, want, want_grads, f"{arch}, precomputed, {layout}")


@pytest.fixture(scope="module")
def lora_models(models, tmp_path_factory):
    """LoRA as train.py loads it (`load_policy_and_reference`: a rank-4 adapter on every linear
    layer, the reference a view of the policy with the adapter off), the adapter moved off zero;
    and the base model loaded on its own, the textbook's reference."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from dpo.model.lora import AdapterOffReference
    from dpo.model.loading import load_policy_and_reference

    arch, _, base = models
    root = tmp_path_factory.mktemp("lora")
    base.save_pretrained(root / "base")
    settings = dict(lora_r=4, attn_implementation=ARCHS[arch], chunked_logps=True)
    policy, view = load_policy_and_reference(
        TrainConfig(model=str(root / "base"), output_dir=str(root / "out"), **settings),
        str(root / "base"))
    assert isinstance(view, AdapterOffReference)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B is zero at init: give the adapter a direction of its own
        for name, p in policy.named_parameters():
            if "lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    reference = AutoModelForCausalLM.from_pretrained(
        root / "base", attn_implementation=ARCHS[arch]).eval().requires_grad_(False)
    return arch, policy.train(), view, reference, settings


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_lora_step_equals_the_textbook(accelerator, lora_models, rows, layout):
    """The LoRA policy against its adapter-off view: the textbook's step with the base model as
    the reference. Only the adapter's weights have gradients."""
    arch, policy, view, reference, settings = lora_models
    want, want_grads = textbook(policy, reference, rows)
    batch = PreferenceCollator(0, **LAYOUTS[layout])(rows)
    got, got_grads = optimised(accelerator, policy, view, batch, **settings)
    assert want_grads and all("lora_" in name for name in want_grads)
    assert_same_step(got, got_grads, want, want_grads, f"{arch}, LoRA, {layout}")


# --- One optimizer step of train.py -----------------------------------------------------------

# The whole run is one batch: 4 pairs, one micro-batch, one optimizer step, no eval. The
# reference is the model moved off itself (`--ref-model`): step 1 then has non-zero rewards and
# a loss other than ln 2, which a policy that starts as its reference would not show.
TRAIN_FLAGS = ["--model", "builtin:tiny-qwen3", "--dataset", "builtin:demo-preferences",
               "--num-samples", "4", "--eval-samples", "0", "--max-length", "64",
               "--batch-size", "4", "--gradient-accumulation-steps", "1", "--max-steps", "1",
               "--learning-rate", "1e-3", "--beta", "0.1", "--logging-steps", "1",
               "--num-sample-generations", "0", "--seed", "3"]
METRICS = {"loss": "losses", "rewards/chosen": "chosen_rewards",
           "rewards/rejected": "rejected_rewards", "logps/chosen": "chosen_logps",
           "logps/rejected": "rejected_logps"}


@pytest.mark.slow
def test_one_train_py_step_is_one_textbook_step(tmp_path, monkeypatch):
    """`train.py` (its defaults: the chunked head, packed rows where the probe allows, length
    grouping, fused AdamW) for one step, against `textbook_dpo_step` on the same 4 pairs, then
    the clipping and AdamW that train.py applies, in this process: the logged loss, rewards,
    log-probs and gradient norm agree to 1e-5, and so does every saved weight's update."""
    from transformers import AutoTokenizer

    from dpo import demo
    from dpo.config import load_config
    from dpo.train.loaders import build_datasets
    from dpo.model.loading import load_causal_lm, load_tokenizer

    env = demo_env(tmp_path / "cache")
    monkeypatch.setenv("DPO_CACHE_DIR", env["DPO_CACHE_DIR"])  # the same demo model and data
    model_path = demo.resolve_model(demo.BUILTIN_MODEL)
    flags = [*TRAIN_FLAGS, "--ref-model", str(tmp_path / "ref"), "--output-dir",
             str(tmp_path / "out")]
    cfg = load_config(flags)
    reference = perturbed(load_causal_lm(cfg, model_path)).eval().requires_grad_(False)
    reference.save_pretrained(tmp_path / "ref")
    AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp_path / "ref")
    run_train(env, *flags)
    logged = train_logs(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")

    tokenizer = load_tokenizer(cfg, model_path)
    pairs, _ = build_datasets(cfg, Accelerator(cpu=True), tokenizer)
    # All of them: train.py's one batch holds them in its own order, which a batch mean ignores.
    assert len(pairs) == 4
    policy = load_causal_lm(cfg, model_path).train()
    step = textbook_dpo_step(policy, reference, PreferenceCollator(tokenizer.pad_token_id)(
        list(pairs)), cfg.beta)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    # torch's AdamW with train.py's settings (train.py runs the fused kernel of the same update);
    # the linear schedule without warm-up is at the full learning rate on step 1.
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}  # clipped, as it steps
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    optimizer.step()

    assert [log["step"] for log in logged] == [1]
    logged = logged[0]
    size = cfg.beta * max(float(getattr(step, v).detach().abs().max()) for v in
                          ("chosen_logps", "rejected_logps", "ref_chosen_logps",
                           "ref_rejected_logps"))
    for key, field in METRICS.items():  # rewards as in `assert_same_step`
        want = float(getattr(step, field).detach().mean())
        assert logged[key] == pytest.approx(want, rel=RTOL, abs=2 * RTOL * size), key
    assert logged["grad_norm"] == pytest.approx(float(grad_norm), rel=RTOL)
    assert abs(logged["loss"] - math.log(2)) > 1e-4 and logged["rewards/chosen"] != 0
    # Adam's first update is lr·g/(|g| + ε) (m̂ = g, v̂ = g²): a sign where |g| ≫ ε, its magnitude
    # held by the gradient norm above. It maps a gradient off by δ to an update off by at most
    # lr·ε·δ/(|g| − δ + ε)², which bites only where |g| is near ε. Each weight must lie within
    # that of the textbook's, for δ = 1e-5 of the tensor's largest gradient entry (with 1e-7 it
    # would not: the check resolves the gradient), plus two float32 roundings of the weight and
    # the fused kernel's rounding of the update.
    lr, eps = cfg.learning_rate, optimizer.defaults["eps"]
    assert saved.keys() == dict(policy.named_parameters()).keys()
    for name, p in policy.named_parameters():
        g = grads[name].abs()
        delta = RTOL * g.max()
        allowed = (lr * eps * delta / ((g - delta).clamp(min=0) + eps) ** 2
                   + 2 * torch.finfo(torch.float32).eps * p.detach().abs() + 1e-6 * lr)
        off = (saved[name] - p.detach()).abs()
        assert (off <= allowed).all(), f"{name}: {float((off / allowed).max()):.2f}× the bound"
