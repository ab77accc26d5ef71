"""The concatenated forward: one model call over `[chosen; rejected]`, halves lined up by pair;
and the start-up probe that checks the chunked head against the model's own logits."""
import json
import shutil

import pytest
import torch
from transformers import Qwen3ForCausalLM

from dpo.config import TrainConfig
from dpo.config import ConfigError
from dpo.model.forward import causal_attention_mask, concatenated_forward
from dpo.model.padding_probe import check_padding_free
from dpo.model.probes import check_chunked_head, settle_logps_path
from dpo.model.logprobs import IGNORE_INDEX, sequence_logps
from dpo.demo.tiny import tiny_qwen3, tiny_qwen3_config
from tests.e2e import demo_env, run_train, train_logs

VOCAB = 50


def _pair_batch():
    """Two pairs, right-padded to T = 10. Prompts of 3 and 4 tokens; responses of varying length
    so that padding differs per row. Rows 0-1 chosen, rows 2-3 rejected."""
    g = torch.Generator().manual_seed(1)
    lengths = [(3, 5), (4, 6), (3, 7), (4, 3)]  # (prompt, response) per row
    input_ids = torch.zeros(4, 10, dtype=torch.long)
    attention_mask = torch.zeros(4, 10, dtype=torch.long)
    labels = torch.full((4, 10), IGNORE_INDEX)
    for row, (p, r) in enumerate(lengths):
        input_ids[row, :p + r] = torch.randint(1, VOCAB, (p + r,), generator=g)
        attention_mask[row, :p + r] = 1
        labels[row, p:p + r] = input_ids[row, p:p + r]
    input_ids[2:, :4] = input_ids[:2, :4]  # same prompt for both halves of a pair
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def logps_row_by_row(model, batch) -> torch.Tensor:
    """`(2B,)` summed log-probs of each row of `batch` run alone, without its padding."""
    alone = []
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        logits = model(batch["input_ids"][row:row + 1, :n]).logits
        alone.append(sequence_logps(logits, batch["labels"][row:row + 1, :n])[0])
    return torch.cat(alone)


@pytest.mark.parametrize("chunked", [False, True])
def test_halves_line_up_with_separate_calls(chunked):
    """Pair i's chosen result equals a separate model call on row i, its rejected result a call
    on row B+i; each row is run alone, without padding, so padding must not leak in."""
    model = tiny_qwen3(VOCAB).eval()
    batch = _pair_batch()
    with torch.no_grad():
        out = concatenated_forward(model, batch, chunked=chunked, chunk_size=4)
    alone = logps_row_by_row(model, batch)
    torch.testing.assert_close(out.chosen_logps, alone[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps, alone[2:], rtol=1e-5, atol=1e-5)
    assert out.chosen_lengths.tolist() == [5, 6] and out.rejected_lengths.tolist() == [7, 3]


def test_chunked_and_plain_agree_including_logit_means():
    model = tiny_qwen3(VOCAB).eval()
    batch = _pair_batch()
    with torch.no_grad():
        plain = concatenated_forward(model, batch, chunked=False)
        chunked = concatenated_forward(model, batch, chunked=True, chunk_size=3)
    for field in ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean"):
        torch.testing.assert_close(getattr(chunked, field), getattr(plain, field),
                                   rtol=1e-5, atol=1e-6, msg=field)


@pytest.mark.parametrize("chunked", [False, True])
def test_one_model_call_for_both_halves(chunked):
    model = tiny_qwen3(VOCAB)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    concatenated_forward(model, _pair_batch(), chunked=chunked)
    assert len(calls) == 1


def test_odd_batch_is_rejected():
    batch = {k: v[:3] for k, v in _pair_batch().items()}
    with pytest.raises(ValueError, match="even number of rows"):
        concatenated_forward(tiny_qwen3(VOCAB), batch)


def test_mask_is_dropped_only_for_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    holey = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]])
    assert causal_attention_mask(right) is None
    assert causal_attention_mask(torch.ones(2, 4, dtype=torch.long)) is None
    assert causal_attention_mask(left) is left and causal_attention_mask(holey) is holey


@pytest.mark.parametrize("chunked", [False, True])
def test_left_padded_batch_keeps_its_mask_and_its_values(chunked):
    """A left-padded batch (not what our collator makes) must still be right: its mask reaches
    the model, and log-probs and gradients equal those of the right-padded batch."""
    model = tiny_qwen3(VOCAB)
    right = _pair_batch()
    left = {k: torch.stack([row.roll(int((1 - m).sum())) for row, m in
                            zip(v, right["attention_mask"])]) for k, v in right.items()}
    assert left["attention_mask"][:, 0].eq(0).any()
    seen = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    results = []
    for batch in (right, left):
        model.zero_grad()
        out = concatenated_forward(model, batch, chunked=chunked, chunk_size=4)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
        results.append((out, model.lm_head.weight.grad.clone()))
    assert seen[0] is None and seen[1] is left["attention_mask"]
    (want, want_grad), (got, got_grad) = results
    # RoPE sees relative positions only: shifting a row leaves its attention unchanged.
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected_logps, want.rejected_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_chunked_forward_keeps_no_per_layer_hidden_states():
    """The chunked path takes the last hidden state only: the model is not asked for every
    layer's (which a no-grad reference forward would hold until it returns)."""
    model = tiny_qwen3(VOCAB, num_layers=4)
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        concatenated_forward(model, _pair_batch(), chunked=True)
    assert len(outputs) == 1 and outputs[0].hidden_states is None


class ScaledHeadQwen3(Qwen3ForCausalLM):
    """A head that does what the chunked path cannot know: its logits are lm_head(h) · 3."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def _unknown_head(dtype=torch.float32) -> ScaledHeadQwen3:
    torch.manual_seed(0)
    model = ScaledHeadQwen3(tiny_qwen3_config(VOCAB))
    with torch.no_grad():  # logits of a few units, as a trained model's (a random init's: ~0.2)
        model.lm_head.weight.mul_(10)
    return model.to(dtype)


class NoBodyQwen3(Qwen3ForCausalLM):
    """`base_model` is the model itself: no body to take the last hidden state from."""

    base_model_prefix = "no_such_module"


def test_probe_passes_a_known_head():
    model = tiny_qwen3(VOCAB).train()
    assert check_chunked_head(model) is None
    assert model.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_probe_names_an_unknown_head(dtype):
    warning = check_chunked_head(_unknown_head(dtype))
    assert warning is not None and len(warning.splitlines()) == 1
    assert warning.startswith("warning: ") and "ScaledHeadQwen3 (qwen3)" in warning
    assert "computing the full logits instead" in warning


def test_probe_names_a_model_without_a_body():
    torch.manual_seed(0)
    warning = check_chunked_head(NoBodyQwen3(tiny_qwen3_config(VOCAB)))
    assert warning is not None and "NoBodyQwen3 (qwen3)" in warning
    assert "no separate base model" in warning


def printed_lines(capsys) -> list[str]:
    """The lines printed since the last call, less DeepSpeed's own line (printed when accelerate
    first imports it, so by whichever test comes first)."""
    return [line for line in capsys.readouterr().out.splitlines()
            if "[real_accelerator.py" not in line]


def test_settle_falls_back_to_full_logits_only_on_a_mismatch(capsys):
    """What train.py calls after prepare: chunked_logps is switched off, with the warning printed
    once, for an unknown head; a known head (or chunked_logps already off) keeps the config."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    cfg = TrainConfig(padding_free=False, share_prompt=False)
    assert cfg.chunked_logps
    settled = settle_logps_path(accelerator, cfg, _unknown_head())
    assert not settled.chunked_logps and cfg.chunked_logps  # a new config, the old one intact
    printed = printed_lines(capsys)
    assert len(printed) == 1 and "ScaledHeadQwen3 (qwen3)" in printed[0]
    assert settle_logps_path(accelerator, cfg, tiny_qwen3(VOCAB)) is cfg
    no_chunks = TrainConfig(chunked_logps=False, padding_free=False, share_prompt=False)
    assert settle_logps_path(accelerator, no_chunks, _unknown_head()) is no_chunks
    assert capsys.readouterr().out == ""


def _causal_only_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention implementation that knows causality and nothing else: without a mask
    function of its own (transformers builds none for it) it cannot keep packed sequences
    apart, as a plain causal kernel could not."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


@pytest.fixture
def causal_only_qwen3():
    from transformers import AttentionInterface

    AttentionInterface.register("causal_only", _causal_only_attention)
    model = tiny_qwen3(VOCAB)
    model.config._attn_implementation = "causal_only"
    return model


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_free_probe_passes_isolating_attention(impl, chunked):
    model = tiny_qwen3(VOCAB).train()
    model.config._attn_implementation = impl
    assert check_padding_free(model, chunked=chunked) is None
    assert model.training  # restored after the probe's eval-mode forward


def test_padding_free_probe_catches_attention_that_mixes_packed_sequences(causal_only_qwen3):
    """The causal-only kernel gives right-padded batches their exact values (the mask is
    dropped for them anyway), packed ones wrong values: the probe says so."""
    batch = _pair_batch()
    with torch.no_grad():
        out = concatenated_forward(causal_only_qwen3.eval(), batch, chunked=True)
    alone = logps_row_by_row(causal_only_qwen3, batch)
    torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]), alone,
                               rtol=1e-5, atol=1e-5)
    reason = check_padding_free(causal_only_qwen3, chunked=True)
    assert reason is not None and "packed sequences' token log-probs differ" in reason


def test_settle_refuses_padding_free_for_attention_that_mixes_sequences(causal_only_qwen3):
    """One ConfigError line naming the model and its attention implementation; the same model
    with sdpa, or without --padding-free, settles."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    cfg = TrainConfig(padding_free=True, share_prompt=False)
    with pytest.raises(ConfigError, match=r"^padding_free: Qwen3ForCausalLM with "
                       r"attn_implementation causal_only does not keep packed sequences apart"
                       ) as error:
        settle_logps_path(accelerator, cfg, causal_only_qwen3)
    assert "\n" not in str(error.value)
    assert settle_logps_path(accelerator, TrainConfig(), causal_only_qwen3).chunked_logps
    causal_only_qwen3.config._attn_implementation = "sdpa"
    assert settle_logps_path(accelerator, cfg, causal_only_qwen3) == cfg


def _causal_only_llama():
    """A reference of another class than the policy (Llama), on the causal-only kernel."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    AttentionInterface.register("causal_only", _causal_only_attention)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, pad_token_id=0))
    model.config._attn_implementation = "causal_only"
    return model.eval().requires_grad_(False)


def test_the_padding_free_probe_covers_a_separate_reference(capsys):
    """A `--ref-model` of another class is probed too, before any packed batch reaches it: one
    that mixes packed sequences turns packing off when it was left unset (one line naming the
    reference), and is a ConfigError naming it when asked for; a reference that keeps them
    apart (or none) leaves the policy's decision standing."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    policy = tiny_qwen3(VOCAB)
    policy.config._attn_implementation = "sdpa"
    reference = _causal_only_llama()
    settled = settle_logps_path(accelerator, TrainConfig(ref_model="other/ref"), policy, reference)
    assert settled.padding_free is False
    printed = [line for line in capsys.readouterr().out.splitlines()  # (not DeepSpeed's)
               if line.startswith("padding-free")]
    assert len(printed) == 1 and printed[0].startswith(
        "padding-free batches: off (the reference other/ref (LlamaForCausalLM) does not keep "
        "packed sequences apart: packed sequences' token log-probs differ"), printed
    with pytest.raises(ConfigError, match=r"^padding_free: the reference other/ref "
                       r"\(LlamaForCausalLM\) with attn_implementation causal_only does not keep "
                       r"packed sequences apart: .*; use sdpa"):
        settle_logps_path(accelerator, TrainConfig(padding_free=True, ref_model="other/ref"),
                          policy, reference)
    reference.config._attn_implementation = "sdpa"
    assert settle_logps_path(accelerator, TrainConfig(), policy, reference).padding_free is True


def test_packed_batches_under_gradient_checkpointing():
    """Under gradient checkpointing, where each layer runs again in the backward, a packed
    batch on packed_sdpa still gets the padded batch's gradients."""
    from dpo.data.batching import PreferenceCollator

    model = tiny_qwen3(VOCAB).train()
    model.config._attn_implementation = "sdpa"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _pair_batch()
    rows = [{f"{side}_{name}": batch[key][row, :int(batch["attention_mask"][row].sum())].tolist()
             for side, row in (("chosen", i), ("rejected", 2 + i))
             for name, key in (("input_ids", "input_ids"), ("labels", "labels"))}
            for i in range(2)]
    grads = []
    for padding_free in (False, True):
        model.zero_grad()
        out = concatenated_forward(model, PreferenceCollator(0, padding_free=padding_free)(rows))
        (out.chosen_logps.sum() - 2 * out.rejected_logps.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert model.config._attn_implementation == "dpo_packed_sdpa"
    scale = grads[0].abs().max()
    torch.testing.assert_close(grads[1] / scale, grads[0] / scale, rtol=1e-5, atol=1e-5)


REMOTE_CODE = """from transformers import Qwen3ForCausalLM


class ScaledHeadQwen3(Qwen3ForCausalLM):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out
"""
SHORT_RUN = ["--dataset", "builtin:demo-preferences", "--num-samples", "16", "--eval-samples",
             "4", "--max-length", "48", "--batch-size", "2", "--gradient-accumulation-steps", "1",
             "--max-steps", "2", "--logging-steps", "1", "--num-sample-generations", "0",
             "--seed", "3"]


@pytest.mark.slow
def test_train_falls_back_for_an_unknown_head(tmp_path):
    """train.py on a model whose own code scales its logits (remote code, as a user's model
    would bring it): the run warns, naming the architecture, and trains exactly as with
    --no-chunked-logps, on the model's own logits."""
    from dpo.demo import build_demo_model

    env = demo_env(tmp_path / "cache")
    model_dir = tmp_path / "scaled-head"
    shutil.copytree(build_demo_model(tmp_path / "cache" / "demo"), model_dir)
    (model_dir / "modeling_scaled.py").write_text(REMOTE_CODE)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_scaled.ScaledHeadQwen3"}
    (model_dir / "config.json").write_text(json.dumps(config))
    flags = [*SHORT_RUN, "--model", str(model_dir), "--trust-remote-code"]
    warned = run_train(env, *flags, "--output-dir", str(tmp_path / "warned"))
    lines = [line for line in warned.stdout.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 1 and "ScaledHeadQwen3 (qwen3)" in lines[0], warned.stdout[-2000:]
    full = run_train(env, *flags, "--no-chunked-logps", "--output-dir", str(tmp_path / "full"))
    assert "warning: " not in full.stdout
    want = train_logs(tmp_path / "full")
    got = train_logs(tmp_path / "warned")
    assert len(got) == 2
    for log, expected in zip(got, want):
        for key in ("loss", "logps/chosen", "logps/rejected", "logits/chosen"):
            assert log[key] == pytest.approx(expected[key], rel=1e-6), key


def _tiny_moe(kind: str, vocab: int = VOCAB, seed: int = 0):
    """A tiny random mixture of experts: 2 layers, 4 experts, 2 per token."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, router_aux_loss_coef=0.02)
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(**{**common, "num_experts": 4, "moe_intermediate_size": 32,
                                   "head_dim": 8, "decoder_sparse_step": 1})
        return Qwen3MoeForCausalLM(config).eval()
    return MixtralForCausalLM(MixtralConfig(**common)).eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("chunked", [True, False])
def test_router_loss_counts_real_tokens_only(kind, chunked):
    """With `router_aux` the forward returns the model's own load-balancing loss under the real
    attention mask; 4 more padding columns leave it unchanged, where the mask-free call lets
    them in and changes it. The log-probs are those of the plain forward."""
    model, batch = _tiny_moe(kind), _pair_batch()
    with torch.no_grad():
        out = concatenated_forward(model, batch, chunked=chunked, router_aux=True)
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=True).aux_loss
        padded = {k: torch.nn.functional.pad(v, (0, 4), value=IGNORE_INDEX if k == "labels"
                                             else 0) for k, v in batch.items()}
        wider = concatenated_forward(model, padded, chunked=chunked, router_aux=True)
        maskless = model(input_ids=padded["input_ids"], output_router_logits=True).aux_loss
        plain = concatenated_forward(model, batch, chunked=chunked)
    torch.testing.assert_close(out.aux_loss, own)
    torch.testing.assert_close(wider.aux_loss, own)
    assert not torch.allclose(maskless, own)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.chosen_logps, plain.chosen_logps, rtol=1e-5, atol=1e-5)


def test_router_loss_coefficient_is_settled_per_model():
    """Default: the MoE config's coefficient; a given one wins; a dense model keeps the config
    (no router loss), and a given non-zero one is one error line."""
    from dpo.config import ConfigError
    from dpo.model.probes import settle_router_aux

    cfg = TrainConfig(model="tiny", dataset="none")
    assert settle_router_aux(cfg, _tiny_moe("mixtral")).router_aux_loss_coef == 0.02
    given = TrainConfig(model="tiny", dataset="none", router_aux_loss_coef=0.5)
    assert settle_router_aux(given, _tiny_moe("qwen3_moe")).router_aux_loss_coef == 0.5
    assert settle_router_aux(cfg, tiny_qwen3(VOCAB)) is cfg
    with pytest.raises(ConfigError, match="router_aux_loss_coef: Qwen3ForCausalLM is not a "
                                          "mixture of experts"):
        settle_router_aux(given, tiny_qwen3(VOCAB))
    packed = TrainConfig(model="tiny", dataset="none", padding_free=True)
    with pytest.raises(ConfigError, match="padding_free: the router loss of a mixture of experts"):
        settle_router_aux(packed, _tiny_moe("mixtral"))
    off = TrainConfig(model="tiny", dataset="none", padding_free=True, router_aux_loss_coef=0.0)
    assert settle_router_aux(off, _tiny_moe("mixtral")) is off


def test_dpo_step_adds_the_weighted_router_loss():
    """losses = preference losses + coef·aux for every pair; at step 0 (policy = reference, the
    same masked attention) the preference part is exactly ln 2."""
    import copy
    import math

    from accelerate import Accelerator

    from dpo.train.step import dpo_step

    policy = _tiny_moe("qwen3_moe")
    reference = copy.deepcopy(policy)
    cfg = TrainConfig(model="tiny", dataset="none", router_aux_loss_coef=0.5)
    out = dpo_step(Accelerator(cpu=True), cfg, policy, reference, _pair_batch())
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.losses - 0.5 * out.aux_loss, torch.full((2,), math.log(2)))
    assert torch.equal(out.chosen_rewards, torch.zeros(2))


@pytest.mark.slow
def test_train_adds_and_logs_the_router_loss_of_a_mixture_of_experts(tmp_path):
    """train.py on a tiny Qwen3-MoE saved beside the demo tokenizer: the router loss is logged as
    `aux_loss` (train and eval), and step 1's loss is ln 2 (policy = reference) plus the config's
    coefficient times it."""
    import math

    from transformers import AutoTokenizer

    from dpo.demo import build_demo_model
    from tests.e2e import eval_logs

    env = demo_env(tmp_path / "cache")
    model_dir = tmp_path / "tiny-moe"
    shutil.copytree(build_demo_model(tmp_path / "cache" / "demo"), model_dir)
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    _tiny_moe("qwen3_moe", vocab=vocab).save_pretrained(model_dir)
    run_train(env, *SHORT_RUN, "--model", str(model_dir), "--eval-on-start",
              "--output-dir", str(tmp_path / "out"))
    first = train_logs(tmp_path / "out")[0]
    assert first["aux_loss"] > 0
    assert first["loss"] == pytest.approx(math.log(2) + 0.02 * first["aux_loss"], rel=1e-5)
    assert all("eval/aux_loss" in log for log in eval_logs(tmp_path / "out"))


def test_settle_padding_free_under_mixed_precision(causal_only_qwen3):
    """The prepared model's forward runs under bf16 autocast; the probe runs it in fp32, where
    a leak between packed sequences stands out of the rounding, and leaves autocast on."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests' Accelerator: fp32
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        # (the head's probe: autocast; shared prompts: the same probe on another layout)
        cfg = TrainConfig(padding_free=True, chunked_logps=False, share_prompt=False)
        model = tiny_qwen3(VOCAB)
        model.config._attn_implementation = "sdpa"
        dtypes = []
        model.model.layers[0].mlp.register_forward_hook(
            lambda m, i, out: dtypes.append(out.dtype))
        model = accelerator.prepare(model)
        assert settle_logps_path(accelerator, cfg, model) == cfg
        assert set(dtypes) == {torch.float32}
        with pytest.raises(ConfigError, match="does not keep packed sequences apart"):
            settle_logps_path(accelerator, cfg, accelerator.prepare(causal_only_qwen3))
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
        assert dtypes[-1] == torch.bfloat16 and logits.dtype == torch.float32  # autocast back
    finally:  # later tests' Accelerator(cpu=True) would otherwise share this bf16 state
        AcceleratorState._reset_state(reset_partial_state=True)


def test_padding_free_is_on_by_default_where_sdpa_passes_the_probe(capsys, monkeypatch):
    """Left unset, padding_free settles to True for an sdpa model that passes the probe, and to
    False, in one line saying why, for an attention implementation it was not measured with, a
    router loss, rows shorter than max_length, or a failed probe (which, asked for, is an
    error). Either way the settled config holds a bool, as the collator needs."""
    from accelerate import Accelerator

    from dpo.model import probes

    accelerator = Accelerator(cpu=True)
    model = tiny_qwen3(VOCAB)
    model.config._attn_implementation = "sdpa"
    assert TrainConfig().padding_free is None
    assert settle_logps_path(accelerator, TrainConfig(), model).padding_free is True
    shared_on = ("shared-prompt batches: on (each prompt computed once for all its responses; "
                 "--no-share-prompt lays them out apart)")
    shared_off = ("shared-prompt batches: off (measured only on packed rows; --share-prompt "
                  "shares them in padded rows too)")

    assert printed_lines(capsys) == [
        "padding-free batches: on (rows of up to 4096 tokens; --no-padding-free pads)", shared_on]
    assert settle_logps_path(accelerator, TrainConfig(padding_free=False, share_prompt=False),
                             model).padding_free is False
    assert capsys.readouterr().out == ""

    def off(cfg, model):
        settled = settle_logps_path(accelerator, cfg, model)
        printed = printed_lines(capsys)
        assert settled.padding_free is False and printed[1:] == [shared_off], printed
        return printed[0]

    assert off(TrainConfig(max_length=8192), model) == (
        "padding-free batches: off (max_length 8192 exceeds padding_free_max_tokens 4096)")
    eager = tiny_qwen3(VOCAB)
    eager.config._attn_implementation = "eager"
    assert off(TrainConfig(), eager) == (
        "padding-free batches: off (attn_implementation eager, measured only with sdpa)")
    assert "router loss" in off(TrainConfig(), _tiny_moe("qwen3_moe"))
    monkeypatch.setattr(probes, "check_padding_free", lambda *a, **k: "a made-up mismatch")
    assert off(TrainConfig(), model) == ("padding-free batches: off (Qwen3ForCausalLM does not "
                                         "keep packed sequences apart: a made-up mismatch)")
    with pytest.raises(ConfigError, match="a made-up mismatch; use sdpa"):
        settle_logps_path(accelerator, TrainConfig(padding_free=True), model)


# --- LD-DPO's and WPO's extras of the forward -------------------------------------------------

def _cut_to_the_shorter(batch):
    """`batch` with each response's labels past its pair's shorter length set to −100."""
    labels = batch["labels"].clone()
    counted = labels != IGNORE_INDEX
    lengths = counted.sum(-1)
    shorter = torch.minimum(lengths[:2], lengths[2:]).repeat(2)
    labels[counted & (counted.cumsum(-1) > shorter.unsqueeze(-1))] = IGNORE_INDEX
    return {**batch, "labels": labels}


def test_excess_tokens_by_hand():
    """`_pair_batch`: pair 0 has |y⁺| = 5 (positions 3–7), |y⁻| = 7 (positions 3–9), so ℓ_p = 5
    and positions 8, 9 of the rejected row are excess; pair 1 has |y⁺| = 6 (positions 4–9),
    |y⁻| = 3, so ℓ_p = 3 and positions 7, 8, 9 of its chosen row are."""
    from dpo.model.forward import excess_tokens

    excess = excess_tokens(_pair_batch()["labels"])
    assert [row.nonzero().flatten().tolist() for row in excess] == [[], [7, 8, 9], [8, 9], []]


@pytest.mark.parametrize("chunked", [False, True])
def test_ld_log_probs_split_at_the_shorter_response(chunked):
    """α = 0 gives the log-probs of each pair cut to its shorter response (each row run alone,
    the excess labels dropped: causal attention makes the first ℓ_p tokens' log-probs the same);
    α = 0.5 the mean of cut and whole; α = 1 the plain log-probs, to the bit."""
    model = tiny_qwen3(VOCAB).eval()
    batch = _pair_batch()
    whole, cut = logps_row_by_row(model, batch), logps_row_by_row(model, _cut_to_the_shorter(batch))
    assert (whole != cut).sum() == 2  # one response in each pair is longer
    with torch.no_grad():
        for alpha, want in ((0.0, cut), (0.5, (whole + cut) / 2)):
            out = concatenated_forward(model, batch, chunked=chunked, chunk_size=4, ld_alpha=alpha)
            got = torch.cat([out.chosen_ld_logps, out.rejected_ld_logps])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        out = concatenated_forward(model, batch, chunked=chunked, chunk_size=4, ld_alpha=1.0)
    assert torch.equal(out.chosen_ld_logps, out.chosen_logps)
    assert torch.equal(out.rejected_ld_logps, out.rejected_logps)


def _log_weights_row_by_row(model, batch) -> torch.Tensor:
    """`(2B,)` WPO's log w = mean_t (log π(y_t) − log Σ_v π(v)²) of each row run alone."""
    out = []
    with torch.no_grad():
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][row].sum())
            logp = torch.log_softmax(model(batch["input_ids"][row:row + 1, :n]).logits[0, :-1], -1)
            labels = batch["labels"][row, 1:n]
            counted = labels != IGNORE_INDEX
            token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out.append(((token - torch.logsumexp(2 * logp, -1))[counted]).mean())
    return torch.stack(out)


@pytest.mark.parametrize("chunked", [False, True])
def test_wpo_log_weights_are_the_per_token_means(chunked):
    model = tiny_qwen3(VOCAB).eval()
    batch = _pair_batch()
    with torch.no_grad():
        out = concatenated_forward(model, batch, chunked=chunked, chunk_size=4, weighting=True)
    got = torch.cat([out.chosen_log_weights, out.rejected_log_weights])
    torch.testing.assert_close(got, _log_weights_row_by_row(model, batch), rtol=1e-5, atol=1e-5)
    assert out.chosen_ld_logps is None  # nothing asked, nothing computed
    plain = concatenated_forward(model, batch, chunked=chunked, chunk_size=4)
    assert plain.chosen_log_weights is None


@pytest.mark.parametrize("chunked", [False, True])
def test_packed_batches_give_the_padded_ld_log_probs_and_weights(chunked):
    """Packed (padding-free) batches are laid out as padded ones before the sums: LD-DPO's
    split and WPO's weights, values and gradients, are the padded batch's."""
    from dpo.data.batching import PreferenceCollator

    batch = _pair_batch()
    rows = [{f"{side}_{name}": batch[key][row, :int(batch["attention_mask"][row].sum())].tolist()
             for side, row in (("chosen", i), ("rejected", 2 + i))
             for name, key in (("input_ids", "input_ids"), ("labels", "labels"))}
            for i in range(2)]
    results = []
    for padding_free in (False, True):
        model = tiny_qwen3(VOCAB)
        out = concatenated_forward(model, PreferenceCollator(0, padding_free=padding_free)(rows),
                                   chunked=chunked, chunk_size=4, ld_alpha=0.3, weighting=True)
        (out.chosen_ld_logps.sum() - 2 * out.rejected_ld_logps.sum()).backward()
        results.append((torch.cat([out.chosen_ld_logps, out.rejected_ld_logps]).detach(),
                        torch.cat([out.chosen_log_weights, out.rejected_log_weights]),
                        torch.cat([p.grad.flatten() for p in model.parameters()])))
    (ld, weights, grads), (ld_packed, weights_packed, grads_packed) = results
    torch.testing.assert_close(ld_packed, ld, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights_packed, weights, rtol=1e-5, atol=1e-5)
    scale = grads.abs().max()
    torch.testing.assert_close(grads_packed / scale, grads / scale, rtol=1e-5, atol=1e-5)
