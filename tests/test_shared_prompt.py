"""Shared-prompt batches (`dpo.data.shared_prompt`, `dpo.model.shared_prompt`): each pair laid
out once as `[prompt | chosen | rejected]` computes what the `[chosen; rejected]` batch does."""
from types import SimpleNamespace

import pytest
import torch

from dpo.data.batching import PreferenceCollator
from dpo.data.shared_prompt import shared_prefix
from dpo.model.forward import concatenated_forward
from dpo.model.logprobs import IGNORE_INDEX as X
from dpo.model.packed_attention import use_packed_sdpa
from dpo.model.shared_prompt import SharedPromptUnsupported, attention_masks, unshare
from tests.test_forward_architectures import (PACKED_CASES, assert_same_logps_and_grads,
                                              logps_and_grads, pair_batch, pair_rows,
                                              tiny_model)

ROWS = [  # prompt 10 11 12; the two responses begin alike (20) but 20 is scored, so not shared
    {"chosen_input_ids": [10, 11, 12, 20, 21], "chosen_labels": [X, X, X, 20, 21],
     "rejected_input_ids": [10, 11, 12, 20, 30, 31], "rejected_labels": [X, X, X, 20, 30, 31]},
    {"chosen_input_ids": [40, 41, 50], "chosen_labels": [X, X, 50],
     "rejected_input_ids": [40, 42, 60], "rejected_labels": [X, X, 60]},  # prompts differ at 42
]


def test_the_shared_prompt_is_the_common_prefix_up_to_the_first_scored_token():
    assert [shared_prefix(r["chosen_input_ids"], r["rejected_input_ids"], r["chosen_labels"],
                          r["rejected_labels"]) for r in ROWS] == [3, 1]


def test_layout_positions_labels_and_the_unshared_view():
    """One pair per row: [prompt | chosen rest | rejected rest], the rejected positions
    restarting at the prompt's length; read back through `unshare`, the rows are the padded
    `[chosen; rejected]` batch's, token for token and label for label."""
    batch = PreferenceCollator(0, share_prompt=True)(ROWS)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 20, 30, 31],
                                           [40, 41, 50, 42, 60, 0, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert batch["position_ids"][1, :5].tolist() == [0, 1, 2, 1, 2]
    assert batch["labels"].tolist() == [[X, X, X, 20, 21, 20, 30, 31],
                                        [X, X, 50, X, 60, X, X, X]]
    assert batch["shared_pairs"].tolist() == [[0, 0, 3, 2, 3], [1, 0, 1, 2, 2]]
    padded = PreferenceCollator(0)(ROWS)
    index, labels = unshare(batch["shared_pairs"], batch["labels"])
    inside = padded["attention_mask"][:, :index.shape[1]].bool()
    assert torch.equal(batch["input_ids"].flatten()[index][inside],
                       padded["input_ids"][:, :index.shape[1]][inside])
    assert torch.equal(labels, padded["labels"][:, :index.shape[1]])


def test_the_rule_lets_each_response_see_the_prompt_and_itself_only():
    batch = PreferenceCollator(0, share_prompt=True, padding_free=True)(ROWS)
    assert batch["input_ids"].shape == (1, 13)  # both pairs in one row, no padding
    # A pair longer than the packed rows' cap gets a row of its own.
    capped = PreferenceCollator(0, share_prompt=True, padding_free=True, max_packed_tokens=6)
    assert capped(ROWS)["shared_pairs"][:, :2].tolist() == [[0, 0], [1, 0]]
    config = tiny_model("llama").config
    config._attn_implementation = "sdpa"
    mask = attention_masks(config, batch["shared_pairs"], batch["position_ids"], torch.float32)
    seen = [set(torch.nonzero(mask[0, 0, q]).flatten().tolist()) for q in range(13)]
    assert seen[4] == {0, 1, 2, 3, 4}  # the last chosen token of pair 0: its prompt and chosen
    assert seen[7] == {0, 1, 2, 5, 6, 7}  # the last rejected token: its prompt and itself
    assert seen[8] == {8}  # pair 1 starts: nothing of pair 0
    assert seen[10] == {8, 9, 10} and seen[12] == {8, 11, 12}  # pair 1's chosen, rejected
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(SharedPromptUnsupported, match="takes no 4-D mask"):
        attention_masks(config, batch["shared_pairs"], batch["position_ids"], torch.float32)


def test_a_pair_without_a_common_prompt_is_two_sequences_side_by_side():
    """Responses that differ from their first token share nothing: the segment is the chosen
    sequence, then the rejected one at positions from 0, and the model scores them as apart."""
    rows = [{**ROWS[1], "rejected_input_ids": [41, 42, 60]}, ROWS[0]]
    batch = PreferenceCollator(0, share_prompt=True, padding_free=True)(rows)
    assert batch["shared_pairs"][0, 2:].tolist() == [0, 3, 3]
    model = tiny_model("llama")
    model.config._attn_implementation = "sdpa"
    assert_same_logps_and_grads(logps_and_grads(model, batch, chunked=True),
                                logps_and_grads(model, PreferenceCollator(0)(rows), chunked=True),
                                "no common prompt")


# The quick tier: a plain model, soft-capping, windowed throughout, windowed and full layers.
QUICK = {"llama", "gemma2", "mistral/window", "gemma3_text/mixed"}


@pytest.mark.parametrize("arch,impl", [
    pytest.param(arch, impl, marks=() if arch in QUICK else pytest.mark.slow)
    for arch, impl in PACKED_CASES])
@pytest.mark.parametrize("packed_sdpa", [False, True], ids=["", "packed_sdpa"])
def test_shared_prompt_equals_separate_sequences(arch, impl, packed_sdpa):
    """Summed log-probs, logit means and every parameter's gradient of the shared-prompt layout
    (one pair per row, and packed: all pairs in one row) equal the `[chosen; rejected]` batch's
    to 1e-5 relative, on the chunked head and the full logits; under sdpa also with the model on
    `packed_sdpa`, as padding-free runs have it. The pairs are longer than the windowed models'
    window, and a response that saw the other one would be off by far more."""
    if packed_sdpa and (impl != "sdpa" or arch == "falcon"):
        pytest.skip("packed_sdpa replaces sdpa only, and not for Falcon (its attention needs the "
                    "dense mask: the padding-free probe keeps it on sdpa)")
    model = tiny_model(arch)
    model.config._attn_implementation = impl
    if packed_sdpa:
        use_packed_sdpa(model)
    rows = pair_rows(pair_batch())
    padded = PreferenceCollator(0)(rows)
    layouts = {"a pair per row": PreferenceCollator(0, share_prompt=True)(rows),
               "packed": PreferenceCollator(0, share_prompt=True, padding_free=True)(rows)}
    saved = padded["attention_mask"].sum() - layouts["packed"]["attention_mask"].sum()
    assert saved == 6 + 9  # each pair's prompt, once
    for chunked in (True, False):
        want, want_grads = logps_and_grads(model, padded, chunked=chunked)
        for name, shared in layouts.items():
            got, got_grads = logps_and_grads(model, shared, chunked=chunked)
            assert_same_logps_and_grads((got, got_grads), (want, want_grads),
                                        f"{arch}/{impl}, {name}, chunked={chunked}")


@pytest.mark.parametrize("arch", ["llama", "gemma3_text/mixed"])
def test_gradient_checkpointing_keeps_the_rule(arch):
    """With gradient checkpointing (as `--gradient-checkpointing` enables it) the recomputed
    layers get the same masks: shared prompts, packed on `packed_sdpa`, give the log-probs and
    gradients of separate sequences without checkpointing, to 1e-5."""
    model = tiny_model(arch)
    model.config._attn_implementation = "sdpa"
    rows = pair_rows(pair_batch())
    want = logps_and_grads(model, PreferenceCollator(0)(rows), chunked=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing acts in training mode only (the tiny models have no dropout)
    use_packed_sdpa(model)
    shared = PreferenceCollator(0, share_prompt=True, padding_free=True)(rows)
    assert_same_logps_and_grads(logps_and_grads(model, shared, chunked=True), want,
                                f"{arch}, gradient checkpointing")


def test_the_probe_turns_it_on_and_refuses_a_model_that_drops_the_rule(capsys):
    """`--share-prompt` is probed on the run's path (here packed, as sdpa's default): a model
    that takes the rule is turned on, in one line; one whose body drops the 4-D masks (so its
    responses would see each other, or lose the prompt) is refused naming it; a mixture of
    experts' router loss is refused (it would count each prompt once). Left unset, the same
    failures turn it off in one line, as do padded rows and a device it was not measured on."""
    from accelerate import Accelerator

    from dpo.config import ConfigError, TrainConfig
    from dpo.model.probes import _not_shared_by_default, settle_logps_path
    from tests.test_forward import _tiny_moe

    accelerator = Accelerator(cpu=True)
    model = tiny_model("qwen3")
    model.config._attn_implementation = "sdpa"
    settled = settle_logps_path(accelerator, TrainConfig(share_prompt=True), model)
    assert settled.share_prompt is True and settled.padding_free is True
    assert "shared-prompt batches: on (each prompt computed once" in capsys.readouterr().out
    body, forward = model.model, model.model.forward
    body.forward = lambda *args, attention_mask=None, **kwargs: forward(*args, **kwargs)
    with pytest.raises(ConfigError, match=r"share_prompt: Qwen3ForCausalLM cannot share prompts: "
                                          r"shared-prompt pairs' token log-probs differ"):
        settle_logps_path(accelerator, TrainConfig(share_prompt=True), model)
    with pytest.raises(ConfigError, match="router loss of a mixture of experts"):
        settle_logps_path(accelerator, TrainConfig(share_prompt=True), _tiny_moe("qwen3_moe"))
    capsys.readouterr()

    def unset(model, **fields) -> str:
        settled = settle_logps_path(accelerator, TrainConfig(**fields), model)
        line = capsys.readouterr().out.splitlines()[-1]
        assert settled.share_prompt is line.startswith("shared-prompt batches: on"), line
        return line

    assert unset(model).startswith("shared-prompt batches: off (Qwen3ForCausalLM cannot share "
                                   "prompts: shared-prompt pairs' token log-probs differ")
    body.forward = forward
    assert unset(model).startswith("shared-prompt batches: on")
    assert unset(model, padding_free=False) == (
        "shared-prompt batches: off (measured only on packed rows; --share-prompt shares them "
        "in padded rows too)")
    assert "measured only on packed rows" in unset(_tiny_moe("qwen3_moe"))  # its router loss
    on_cuda = SimpleNamespace(device=torch.device("cuda", 0))
    assert _not_shared_by_default(on_cuda, TrainConfig(padding_free=True)) == (
        "not measured on cuda, where packed rows run one variable-length kernel call; "
        "--share-prompt turns it on")


RANKED_ROWS = [  # prompts 10 11 12 and 40 41: rankings of 3, 2 and 4 responses
    {"chosen_input_ids": [10, 11, 12, 20, 21], "chosen_labels": [X, X, X, 20, 21],
     "rejected_input_ids": [10, 11, 12, 30], "rejected_labels": [X, X, X, 30],
     "more_input_ids": [[10, 11, 12, 25, 26, 27]], "more_labels": [[X, X, X, 25, 26, 27]],
     "stages": 2},
    {"chosen_input_ids": [40, 41, 50], "chosen_labels": [X, X, 50],
     "rejected_input_ids": [40, 41, 60, 61], "rejected_labels": [X, X, 60, 61],
     "more_input_ids": [], "more_labels": [], "stages": 1},
    {"chosen_input_ids": [40, 41, 51], "chosen_labels": [X, X, 51],
     "rejected_input_ids": [40, 41, 62], "rejected_labels": [X, X, 62],
     "more_input_ids": [[40, 41, 63, 64], [40, 41, 65]], "more_labels": [[X, X, 63, 64],
                                                                       [X, X, 65]],
     "stages": 1},
]


def ranked_logps_and_grads(model, batch):
    model.zero_grad()
    out = concatenated_forward(model, batch, chunked=True, chunk_size=7)
    # Distinct weights per response, so that a mix-up of rows or slots shows in the gradients.
    (out.slot_logps * torch.arange(1.0, 13.0).reshape(3, 4)).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_ranked_layout_and_the_rule_for_k_responses():
    """[prompt | r1 | r2 | r3 | r4]: each response restarts at the prompt's length and sees the
    prompt and itself only; a missing response has rest length 0."""
    batch = PreferenceCollator(0, share_prompt=True, padding_free=True)(RANKED_ROWS)
    assert batch["shared_pairs"].tolist() == [[0, 0, 3, 2, 1, 3, 0], [0, 9, 2, 1, 2, 0, 0],
                                              [0, 14, 2, 1, 1, 2, 1]]
    assert batch["position_ids"][0, :9].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5]
    assert batch["ranking_mask"].tolist() == [[True, True, True, False],
                                              [True, True, False, False], [True] * 4]
    config = tiny_model("llama").config
    config._attn_implementation = "sdpa"
    mask = attention_masks(config, batch["shared_pairs"], batch["position_ids"], torch.float32)
    seen = [set(torch.nonzero(mask[0, 0, q]).flatten().tolist()) for q in range(21)]
    assert seen[5] == {0, 1, 2, 5} and seen[8] == {0, 1, 2, 6, 7, 8}
    assert seen[20] == {14, 15, 20}  # row 3's fourth response: its prompt and itself


@pytest.mark.parametrize("packed", [False, True])
def test_shared_prompt_rankings_equal_separate_sequences(packed):
    """Rankings of 3, 2 and 4 responses: every slot's log-prob and every gradient equal to the
    padded K-slot batch's, to 1e-5; the missing slots' log-probs are 0 in both."""
    model = tiny_model("llama")
    model.config._attn_implementation = "sdpa"
    shared = PreferenceCollator(0, share_prompt=True, padding_free=packed)(RANKED_ROWS)
    padded = PreferenceCollator(0)(RANKED_ROWS)
    assert padded["input_ids"].shape[0] == 12
    got, got_grads = ranked_logps_and_grads(model, shared)
    want, want_grads = ranked_logps_and_grads(model, padded)
    for field in ("slot_logps", "slot_lengths", "slot_logits_mean"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5,
                                   atol=1e-6)
    assert want.slot_logps[1, 2:].tolist() == [0.0, 0.0] and want.slot_logps[0, 3] == 0
    for param, g in want_grads.items():
        scale = g.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(got_grads[param] / scale, g / scale, rtol=1e-5, atol=1e-5)
