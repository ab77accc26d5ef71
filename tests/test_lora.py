"""LoRA through peft (`dpo.model.lora`): the reference as the policy with its adapter off,
`--ref-model`, adapter starts, outputs, resume and bad inputs. Every equality is checked on
log-probs, on two model families (a tiny Qwen3, and a tiny Llama with tied embeddings)."""
import json
import math
import signal
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from dpo.config import ConfigError, TrainConfig
from dpo.model.forward import concatenated_forward
from dpo.model.loading import load_policy_and_reference
from dpo.demo.tiny import tiny_qwen3
from tests.e2e import demo_env, run_train

peft = pytest.importorskip("peft")

VOCAB = 512


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=128))


FAMILIES = {"qwen3": lambda seed: tiny_qwen3(VOCAB, seed=seed, hidden_size=32,
                                              max_position_embeddings=128),
            "llama": tiny_llama}


def save_model(model, directory, tokenizer=None):
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def base_dir(family, tmp_path, tiny_tokenizer):
    return save_model(FAMILIES[family](0), tmp_path / "base", tiny_tokenizer)


def make_cfg(model, tmp_path, **settings) -> TrainConfig:
    return TrainConfig(model=str(model), output_dir=str(tmp_path / "out"), **settings)


def make_batch(seed: int = 1, pairs: int = 2, length: int = 20) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2 * pairs, length), generator=generator)
    labels = ids.clone()
    labels[:, :length // 3] = -100
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # one right-padded row
    labels[1, -5:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logps(model, batch, chunked=True) -> torch.Tensor:
    with torch.no_grad():
        out = concatenated_forward(model, batch, chunked=chunked, chunk_size=8)
    return torch.cat([out.chosen_logps, out.rejected_logps])


def perturb_adapter(model, name="default", seed=3):
    """Give an adapter's B (zero at init) random values: the policy then differs from its base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f"lora_B.{name}." in key:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def load_base(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("chunked", [True, False])
def test_step0_is_ln2_and_the_reference_is_the_base_with_the_adapter_off(base_dir, tmp_path,
                                                                          chunked):
    from dpo.model.lora import AdapterOffReference
    from dpo.train.step import dpo_step

    cfg = make_cfg(base_dir, tmp_path, lora_r=4, chunked_logps=chunked, logps_chunk_size=8)
    set_seed(0)
    policy, reference = load_policy_and_reference(cfg, str(base_dir))
    assert isinstance(reference, AdapterOffReference)  # no second model
    trainable = {k for k, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    batch = make_batch()
    policy.train()
    out = dpo_step(Accelerator(cpu=True), cfg, policy, reference, batch)
    losses, chosen_r, rejected_r = out.losses, out.chosen_rewards, out.rejected_rewards
    assert torch.equal(losses, torch.full_like(losses, 2.0).log())  # exactly ln 2
    assert torch.equal(chosen_r, torch.zeros_like(chosen_r))
    assert torch.equal(rejected_r, torch.zeros_like(rejected_r))

    perturb_adapter(policy)  # as after training: policy and base now differ
    want = logps(load_base(base_dir), batch, chunked)
    torch.testing.assert_close(logps(reference, batch, chunked), want, rtol=1e-6, atol=1e-6)
    assert (logps(policy, batch, chunked) - want).abs().max() > 1e-2  # the adapter is back on
    assert policy.training  # the reference call restored the policy's mode and trainability
    assert {k for k, p in policy.named_parameters() if p.requires_grad} == trainable


def test_precomputed_and_generated_reference_is_the_base(base_dir, tmp_path):
    """`--precompute-ref-logps` and the reference's sample answers run on the adapter-off
    view: the same values as the base model's."""
    from datasets import Dataset

    from dpo.data import PreferenceCollator
    from dpo.train.reference_cache import precompute_reference_logps

    cfg = make_cfg(base_dir, tmp_path, lora_r=4)
    policy, reference = load_policy_and_reference(cfg, str(base_dir))
    perturb_adapter(policy)
    batch = make_batch(pairs=3)
    rows = [{"chosen_input_ids": batch["input_ids"][i].tolist(),
             "chosen_labels": batch["labels"][i].tolist(),
             "rejected_input_ids": batch["input_ids"][i + 3].tolist(),
             "rejected_labels": batch["labels"][i + 3].tolist(), "length": 20}
            for i in range(3)]
    accelerator = Accelerator(cpu=True)
    settings = dict(batch_size=2, chunked=True, chunk_size=8, cache_dir=None,
                    cache_key_parts=None)
    got, want = (precompute_reference_logps(accelerator, model, Dataset.from_list(rows),
                                            PreferenceCollator(0), **settings)
                 for model in (reference, load_base(base_dir)))
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(got[column]), torch.tensor(want[column]),
                                   rtol=1e-6, atol=1e-6)
    prompt = batch["input_ids"][:1, :6]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(reference.generate(prompt, **kwargs), load_base(base_dir).generate(
        prompt, **kwargs))


def test_gradient_checkpointing_gives_the_same_gradients(base_dir, tmp_path):
    grads = []
    for checkpointing in (False, True):
        cfg = make_cfg(base_dir, tmp_path, lora_r=4, gradient_checkpointing=checkpointing)
        set_seed(0)
        policy, reference = load_policy_and_reference(cfg, str(base_dir))
        perturb_adapter(policy)
        policy.train()
        batch = make_batch()
        out = concatenated_forward(policy, batch, chunk_size=8)
        torch.testing.assert_close(logps(reference, batch), logps(load_base(base_dir), batch),
                                   rtol=1e-6, atol=1e-6)
        (out.chosen_logps - out.rejected_logps).sum().backward()
        grads.append({k: p.grad for k, p in policy.named_parameters() if p.requires_grad})
    assert policy.is_gradient_checkpointing
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for k, g in grads[0].items() if "lora_A" in k)


def test_ref_model_loads_the_other_weights(family, base_dir, tmp_path, tiny_tokenizer):
    other = save_model(FAMILIES[family](1), tmp_path / "other", tiny_tokenizer)
    batch = make_batch()
    for lora_r in (0, 4):
        cfg = make_cfg(base_dir, tmp_path, lora_r=lora_r, ref_model=str(other))
        policy, reference = load_policy_and_reference(cfg, str(base_dir))
        torch.testing.assert_close(logps(reference, batch), logps(load_base(other), batch),
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logps(policy, batch), logps(load_base(base_dir), batch),
                                   rtol=1e-6, atol=1e-6)
        assert not any(p.requires_grad for p in reference.parameters())


def test_ref_model_with_another_tokenizer_is_one_error_line(base_dir, tmp_path, tiny_tokenizer):
    tiny_tokenizer.add_tokens(["<extra>"])
    other = save_model(FAMILIES["qwen3"](1), tmp_path / "other", tiny_tokenizer)
    cfg = make_cfg(base_dir, tmp_path, ref_model=str(other))
    with pytest.raises(ConfigError, match=r"^ref_model .*: its tokenizer differs from --model's"):
        load_policy_and_reference(cfg, str(base_dir))


@pytest.fixture
def sft_adapter(base_dir, tmp_path, tiny_tokenizer):
    """An SFT adapter folder on `base_dir` (B random, so it differs from the base), and the
    log-probs of the SFT model it makes."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    perturb_adapter(model, seed=5)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    path = tmp_path / "sft"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path, logps(model.get_base_model().eval(), make_batch())


def test_adapter_start_trains_it_further_against_a_frozen_copy(base_dir, sft_adapter, tmp_path):
    path, sft = sft_adapter
    batch = make_batch()
    cfg = make_cfg(path, tmp_path)
    policy, reference = load_policy_and_reference(cfg, str(path))
    torch.testing.assert_close(logps(policy, batch), sft, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logps(reference, batch), sft, rtol=1e-6, atol=1e-6)
    trainable = [k for k, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in k for k in trainable)  # the copy is frozen
    perturb_adapter(policy, seed=9)  # training moves the policy's adapter only
    torch.testing.assert_close(logps(reference, batch), sft, rtol=1e-6, atol=1e-6)
    assert (logps(policy, batch) - sft).abs().max() > 1e-2
    assert [k for k, p in policy.named_parameters() if p.requires_grad] == trainable


def test_adapter_start_with_lora_r_merges_it_and_trains_a_new_one(sft_adapter, tmp_path):
    path, sft = sft_adapter
    batch = make_batch()
    cfg = make_cfg(path, tmp_path, lora_r=2)
    policy, reference = load_policy_and_reference(cfg, str(path))
    torch.testing.assert_close(logps(policy, batch), sft, rtol=1e-5, atol=1e-5)
    perturb_adapter(policy, seed=9)
    torch.testing.assert_close(logps(reference, batch), sft, rtol=1e-5, atol=1e-5)
    assert (logps(policy, batch) - sft).abs().max() > 1e-2
    assert {p.shape[0] for k, p in policy.named_parameters() if "lora_A" in k} == {2}


@pytest.mark.parametrize("field", ["modules_to_save", "target_modules"])
def test_an_adapter_that_adapts_the_head_is_merged_not_trained_further(base_dir, tmp_path,
                                                                       tiny_tokenizer, field):
    """An SFT adapter that trained a copy of the LM head (or a LoRA on it): trained further, one
    line says why not and what to do; with --lora-r, as it says, the adapter is merged and the
    policy and the reference are the SFT model, head included (chunked and full log-probs; with
    tied embeddings the head is untied for the merge), as is the adapter as --ref-model."""
    from peft import LoraConfig, get_peft_model

    lora = {"modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
            "target_modules": dict(target_modules=["q_proj", "lm_head"])}[field]
    model = get_peft_model(load_base(base_dir), LoraConfig(r=4, **lora))
    perturb_adapter(model, seed=5)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "modules_to_save" in key:
                p.mul_(1.5)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    path = save_model(model, tmp_path / "sft", tiny_tokenizer)
    batch, sft = make_batch(), model.get_base_model().eval()

    with pytest.raises(ConfigError) as error:
        load_policy_and_reference(make_cfg(path, tmp_path), str(path))
    assert str(error.value) == (
        f"model {path}: the adapter adapts the LM head (lm_head, in its {field}), which is never "
        "trained further here (the chunked log-probs read the head's weight directly); pass "
        "--lora-r R to merge the adapter into its base and train a new adapter on top, or pass "
        "the merged model as --model")
    policy, reference = load_policy_and_reference(make_cfg(path, tmp_path, lora_r=2), str(path))
    _, ref_model = load_policy_and_reference(make_cfg(base_dir, tmp_path, ref_model=str(path)),
                                             str(base_dir))  # --ref-model merges it too
    want = logps(sft, batch, chunked=False)
    assert (want - logps(load_base(base_dir), batch, chunked=False)).abs().max() > 1e-2
    for model in (policy, reference, ref_model):
        for chunked in (True, False):
            torch.testing.assert_close(logps(model, batch, chunked), want, rtol=1e-5, atol=1e-5)


# --- Bad inputs: one line each -------------------------------------------------------------

@pytest.mark.parametrize("field", ["lora_target_modules", "lora_modules_to_save"])
def test_naming_the_lm_head_is_refused(field, tmp_path):
    with pytest.raises(ConfigError, match=f"^{field}: 'lm_head' is the LM head, which is never "
                                          "adapted"):
        make_cfg("m", tmp_path, lora_r=4, **{field: ["q_proj", "lm_head"]})


def test_training_the_embedding_tied_to_the_head_is_refused(tmp_path, tiny_tokenizer):
    base = save_model(tiny_llama(0), tmp_path / "llama", tiny_tokenizer)
    cfg = make_cfg(base, tmp_path, lora_r=4, lora_modules_to_save=["embed_tokens"])
    with pytest.raises(ConfigError, match="model.embed_tokens shares its weight with the LM head"):
        load_policy_and_reference(cfg, str(base))


def test_without_peft_the_flags_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ConfigError) as error:
        make_cfg("m", tmp_path, lora_r=4)
    assert str(error.value) == ('LoRA and PEFT adapters need the peft package: '
                                'pip install -e ".[peft]"')


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_4bit_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="^load_in_4bit needs a GPU"):
        make_cfg("m", tmp_path, lora_r=4, load_in_4bit=True)


def test_lora_settings_without_lora_r_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="^lora_target_modules is set but lora_r is 0"):
        make_cfg("m", tmp_path, lora_target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="^merge_adapter: there is no adapter"):
        make_cfg("m", tmp_path, merge_adapter=True)


# --- End to end: train.py with LoRA ----------------------------------------------------------

COMMON = ["--model", "builtin:tiny-qwen3", "--dataset", "builtin:demo-preferences",
          "--num-samples", "48", "--eval-samples", "10", "--max-length", "64", "--max-steps", "4",
          "--logging-steps", "1", "--eval-steps", "2", "--learning-rate", "1e-2",
          "--num-sample-generations", "1", "--max-new-tokens", "4", "--seed", "7",
          "--lora-r", "8", "--lora-alpha", "16"]
SINGLE = ["--batch-size", "4", "--gradient-accumulation-steps", "1"]
TWO = ["--batch-size", "2", "--gradient-accumulation-steps", "1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return demo_env(tmp_path_factory.mktemp("dpo_cache"))


@pytest.fixture(scope="module")
def single(env, tmp_path_factory):
    """One process, evaluated before the first step, the merged model written too."""
    out = tmp_path_factory.mktemp("single") / "out"
    run_train(env, *COMMON, *SINGLE, "--eval-on-start", "--merge-adapter",
              "--output-dir", str(out))
    return out


def adapter_weights(out):
    return load_file(out / "adapter_model.safetensors")


def demo_batch():
    """Pairs of demo-vocabulary tokens (1024) for comparing saved models."""
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 1024, (4, 24), generator=generator)
    labels = ids.clone()
    labels[:, :8] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.slow
def test_a_lora_run_starts_at_ln2_and_lowers_the_loss(single):
    from tests.e2e import eval_logs, train_logs

    first = train_logs(single)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/margins"] == 0 and first["rewards/chosen"] == 0
    evals = [log["eval/loss"] for log in eval_logs(single)]
    assert evals[0] == pytest.approx(math.log(2), abs=1e-7)  # before the first step
    assert evals[-1] < evals[0] - 0.01


@pytest.mark.slow
def test_outputs_load_with_peft_and_the_merged_model_agrees(single):
    from peft import AutoPeftModelForCausalLM

    assert not (single / "model.safetensors").exists()  # the adapter, not a full model
    config = json.loads((single / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((single / "base").resolve())
    assert not any("lm_head" in k for k in adapter_weights(single))
    adapted = AutoPeftModelForCausalLM.from_pretrained(single).eval()
    merged = AutoModelForCausalLM.from_pretrained(single / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(single / "base").eval()
    batch = demo_batch()
    want = logps(adapted.get_base_model(), batch)
    torch.testing.assert_close(logps(merged, batch), want, rtol=1e-5, atol=1e-5)
    assert (logps(base, batch) - want).abs().max() > 1e-3  # it did train


@pytest.mark.slow
def test_precomputed_reference_matches_the_adapter_off_one(env, single, tmp_path):
    from tests.e2e import assert_same_logs, eval_logs, train_logs

    out = tmp_path / "out"
    log = run_train(env, *COMMON, *SINGLE, "--eval-on-start", "--precompute-ref-logps",
                    "--output-dir", str(out))
    assert "reference: freed; training on its precomputed log-probs" in log.stdout + log.stderr
    assert_same_logs(train_logs(out), train_logs(single), rel=1e-5)
    assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-5)
    assert_close_adapters(out, single, rel=1e-5)


@pytest.mark.slow
def test_an_output_adapter_starts_the_next_run(env, single, tmp_path):
    """`--model <adapter folder>`: without --lora-r it trains further against a frozen copy of
    itself (step 0 at exactly ln 2); its output names the same base."""
    from tests.e2e import train_logs

    out = tmp_path / "out"
    flags = [f for f in COMMON if f not in ("--lora-r", "8", "--lora-alpha", "16")]
    flags[flags.index("builtin:tiny-qwen3")] = str(single)
    run_train(env, *flags, *SINGLE, "--max-steps", "2", "--output-dir", str(out))
    assert train_logs(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((single / "base").resolve())
    assert adapter_weights(out).keys() == adapter_weights(single).keys()


@pytest.mark.slow
def test_a_bad_lora_flag_is_one_line(env, tmp_path):
    result = run_train(env, *COMMON, "--lora-target-modules", "q_proj", "lm_head",
                       "--output-dir", str(tmp_path / "out"), check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: lora_target_modules: 'lm_head' is the LM head, which is never adapted (the "
        "chunked log-probs read its weight directly); drop it"]
    assert not (tmp_path / "out").exists()


def assert_close_adapters(out, expected, rel):
    got, want = adapter_weights(out), adapter_weights(expected)
    assert got.keys() == want.keys()
    for name, w in want.items():
        err = (got[name] - w).norm() / w.norm().clamp(min=1e-12)
        assert err <= rel, f"{name}: relative difference {err.item():.2e} > {rel}"


# --- Two processes against one, and resume after SIGKILL --------------------------------------

@pytest.mark.slow
@pytest.mark.parallel
@pytest.mark.parametrize("layout", ["ddp", "zero2", "zero3"])
def test_two_processes_match_one_with_lora(env, single, tmp_path, layout):
    """DDP, ZeRO-2 and ZeRO-3 (the adapter-off reference on the sharded policy): per-step
    metrics, eval metrics and the adapter equal one process with the same global batch."""
    from tests.e2e import (ACCELERATE, assert_same_logs, eval_logs, free_port, train_logs)

    launcher = [*ACCELERATE, "--num_processes", "2", "--main_process_port", str(free_port())]
    launcher += {"ddp": ["--multi_gpu"], "zero2": ["--use_deepspeed", "--zero_stage", "2"],
                 "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag",
                           "true"]}[layout]
    out = tmp_path / "out"
    log = run_train(env, *COMMON, *TWO, "--eval-on-start", "--merge-adapter",
                    "--output-dir", str(out), launcher=launcher)
    assert "reference: the policy with its adapter off (no second model)" in log.stdout
    assert_same_logs(train_logs(out), train_logs(single), rel=1e-4)
    assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-4)
    assert_close_adapters(out, single, rel=1e-4)
    merged, want = (AutoModelForCausalLM.from_pretrained(d / "merged") for d in (out, single))
    torch.testing.assert_close(logps(merged, demo_batch()), logps(want, demo_batch()),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sigkill_then_resume_is_exact_with_lora(env, tmp_path):
    from tests.e2e import read_metrics, train_logs
    from tests.test_checkpoint import RUN, start, wait_for

    lora = ["--lora-r", "8", "--lora-dropout", "0.1"]  # dropout: its RNG must resume too
    reference = tmp_path / "reference"
    run_train(env, *RUN, *lora, "--output-dir", str(reference))
    out = tmp_path / "out"
    proc = start(env, out, *lora)
    wait_for(proc, "step 9:")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_train(env, *RUN, *lora, "--output-dir", str(out), "--resume-from-checkpoint", "latest")
    got, want = adapter_weights(out), adapter_weights(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [log["step"] for log in train_logs(out)] == list(range(1, 17))
    from tests.e2e import assert_same_logs

    assert_same_logs(read_metrics(out), read_metrics(reference), rel=1e-6)
