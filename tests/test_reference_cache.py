"""Precomputed reference log-probs: equal to the on-the-fly reference, cached, never stale."""
import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch.utils.data import DataLoader

from dpo.config import ConfigError, TrainConfig
from dpo.data import IGNORE_INDEX, REF_LOGPS_COLUMNS, PreferenceCollator
from dpo.model.forward import concatenated_forward
from dpo.train.reference_cache import precompute_reference_logps
from dpo.train.reference_key import cache_key, data_digest, reference_key_parts
from dpo.train.step import dpo_step
from dpo.demo.tiny import tiny_qwen3
from tests.e2e import chat_model_cache, demo_env, run_train, weights_equal

VOCAB = 97
PAD = 0


def pairs_dataset(num_pairs: int = 10, seed: int = 0) -> Dataset:
    """Tokenized pairs (the columns of data.tokenize_preferences) of varied lengths."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_pairs):
        prompt = rng.integers(1, VOCAB, rng.integers(2, 9)).tolist()
        chosen, rejected = (rng.integers(1, VOCAB, rng.integers(1, 12)).tolist() for _ in "cr")
        rows.append({
            "chosen_input_ids": prompt + chosen,
            "chosen_labels": [IGNORE_INDEX] * len(prompt) + chosen,
            "rejected_input_ids": prompt + rejected,
            "rejected_labels": [IGNORE_INDEX] * len(prompt) + rejected,
            "length": len(prompt) + max(len(chosen), len(rejected)),
            "row_index": i,
        })
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def reference():
    model = tiny_qwen3(VOCAB, seed=3).eval()
    model.requires_grad_(False)
    return model


class ForwardCounter:
    """Counts the model calls of `reference` (a cache hit must make none)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def precompute(accelerator, reference, ds, cache_dir, parts=None, chunked=True, batch_size=3,
               ld_alpha=None):
    return precompute_reference_logps(
        accelerator, reference, ds, PreferenceCollator(PAD), batch_size=batch_size,
        chunked=chunked, chunk_size=5, cache_dir=cache_dir,
        cache_key_parts={"model": "tiny-seed-3"} if parts is None else parts, ld_alpha=ld_alpha)


def ref_columns(ds: Dataset) -> torch.Tensor:
    return torch.tensor([ds[name] for name in REF_LOGPS_COLUMNS])


@pytest.mark.parametrize("chunked", [True, False])
def test_equal_to_the_on_the_fly_reference(accelerator, reference, tmp_path, chunked):
    """Per pair, to 1e-5 relative, although the pass batches the rows differently (longest
    first, 3 pairs) from the training loader (2 pairs in row order): padding changes nothing."""
    ds = precompute(accelerator, reference, pairs_dataset(), tmp_path, chunked=chunked)
    assert ds.features["ref_chosen_logps"].dtype == "float32"
    loader = DataLoader(ds, batch_size=2, collate_fn=PreferenceCollator(PAD))
    for batch in loader:
        with torch.no_grad():
            out = concatenated_forward(reference, batch, chunked=chunked, chunk_size=5)
        torch.testing.assert_close(batch["ref_chosen_logps"], out.chosen_logps,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch["ref_rejected_logps"], out.rejected_logps,
                                   rtol=1e-5, atol=1e-6)


def test_collator_passes_the_values_through_in_pair_order():
    ds = pairs_dataset(3).add_column("ref_chosen_logps", [-1.5, -2.5, -3.5])
    ds = ds.add_column("ref_rejected_logps", [-4.0, -5.0, -6.0])
    batch = PreferenceCollator(PAD)([ds[2], ds[0]])
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["ref_chosen_logps"].tolist() == [-3.5, -1.5]
    assert batch["ref_rejected_logps"].tolist() == [-6.0, -4.0]
    assert batch["input_ids"].shape[0] == 4
    assert not set(REF_LOGPS_COLUMNS) & set(PreferenceCollator(PAD)([pairs_dataset(1)[0]]))


def test_dpo_step_uses_them_instead_of_a_reference_forward(accelerator, reference, tmp_path):
    """Same losses and rewards as with the live reference; the reference is never called."""
    cfg = TrainConfig(model="tiny", dataset="none", chunked_logps=True, logps_chunk_size=5,
                      beta=0.1)
    policy = tiny_qwen3(VOCAB, seed=4)  # differs from the reference: non-zero rewards
    ds = precompute(accelerator, reference, pairs_dataset(), tmp_path)
    batch = PreferenceCollator(PAD)([ds[i] for i in range(4)])
    live = {k: v for k, v in batch.items() if k not in REF_LOGPS_COLUMNS}
    out = dpo_step(accelerator, cfg, policy, reference, live)
    losses, chosen_r, rejected_r = out.losses, out.chosen_rewards, out.rejected_rewards
    with ForwardCounter(reference) as counter:
        pre = dpo_step(accelerator, cfg, policy, None, batch)
        losses_pre, chosen_pre, rejected_pre = pre.losses, pre.chosen_rewards, pre.rejected_rewards
        dpo_step(accelerator, cfg, policy, reference, batch)
    assert counter.calls == 0
    assert chosen_r.abs().min() > 0
    for got, want in ((losses_pre, losses), (chosen_pre, chosen_r), (rejected_pre, rejected_r)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    losses_pre.mean().backward()  # the policy still gets its gradient
    assert policy.lm_head.weight.grad is not None


def test_ld_dpo_stores_the_desensitised_reference(accelerator, reference, tmp_path):
    """With LD-DPO the reference's log-probs are desensitised too: the columns hold them (not
    the plain sums), and a step on them equals the step with the live reference."""
    ds = precompute(accelerator, reference, pairs_dataset(), tmp_path, ld_alpha=0.5)
    batch = PreferenceCollator(PAD)([ds[i] for i in range(4)])
    live = {k: v for k, v in batch.items() if k not in REF_LOGPS_COLUMNS}
    with torch.no_grad():
        out = concatenated_forward(reference, live, chunk_size=5, ld_alpha=0.5)
    torch.testing.assert_close(batch["ref_chosen_logps"], out.chosen_ld_logps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch["ref_rejected_logps"], out.rejected_ld_logps,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(torch.cat([out.chosen_ld_logps, out.rejected_ld_logps]),
                              torch.cat([out.chosen_logps, out.rejected_logps]))
    cfg = TrainConfig(model="tiny", dataset="none", logps_chunk_size=5, ld_alpha=0.5)
    policy = tiny_qwen3(VOCAB, seed=4)
    torch.testing.assert_close(dpo_step(accelerator, cfg, policy, None, batch).losses,
                               dpo_step(accelerator, cfg, policy, reference, live).losses,
                               rtol=1e-5, atol=1e-6)


def test_cache_hit_reuses_values_without_a_forward(accelerator, reference, tmp_path):
    first = precompute(accelerator, reference, pairs_dataset(), tmp_path)
    assert len(list(tmp_path.glob("ref-logps-*.safetensors"))) == 1
    with ForwardCounter(reference) as counter:
        again = precompute(accelerator, reference, pairs_dataset(), tmp_path)
    assert counter.calls == 0
    assert torch.equal(ref_columns(again), ref_columns(first))
    # Existing ref columns are replaced, not duplicated.
    assert again.column_names.count("ref_chosen_logps") == 1
    with ForwardCounter(reference) as counter:
        precompute(accelerator, reference, again, tmp_path)
    assert counter.calls == 0


@pytest.mark.parametrize("change", ["data", "row order", "model", "chunked", "ld_alpha"])
def test_cache_misses_when_anything_the_values_depend_on_changes(accelerator, reference,
                                                                  tmp_path, change):
    precompute(accelerator, reference, pairs_dataset(), tmp_path)
    ds, kwargs = pairs_dataset(), {}
    if change == "data":  # one token of one response
        ids = [list(row) for row in ds["chosen_input_ids"]]
        ids[4][-1] = ids[4][-1] % (VOCAB - 1) + 1
        ds = ds.remove_columns("chosen_input_ids").add_column("chosen_input_ids", ids)
    elif change == "row order":
        ds = ds.select(list(reversed(range(len(ds)))))
    elif change == "model":
        kwargs["parts"] = {"model": "another"}
    elif change == "ld_alpha":
        kwargs["ld_alpha"] = 0.5
    else:
        kwargs["chunked"] = False
    with ForwardCounter(reference) as counter:
        precompute(accelerator, reference, ds, tmp_path, **kwargs)
    assert counter.calls > 0
    assert len(list(tmp_path.glob("ref-logps-*.safetensors"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "tampered values"])
def test_damaged_cache_file_is_recomputed_and_rewritten(accelerator, reference, tmp_path,
                                                        damage, capsys):
    want = ref_columns(precompute(accelerator, reference, pairs_dataset(), tmp_path))
    (path,) = tmp_path.glob("ref-logps-*.safetensors")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 8])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:  # valid file, values changed behind the checksum's back
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        tensors["chosen"][0] += 1.0
        save_file(tensors, str(path), metadata=metadata)
    with ForwardCounter(reference) as counter:
        got = ref_columns(precompute(accelerator, reference, pairs_dataset(), tmp_path))
    assert counter.calls > 0 and "ignoring cache file" in capsys.readouterr().err
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    with ForwardCounter(reference) as counter:  # rewritten: a hit again
        precompute(accelerator, reference, pairs_dataset(), tmp_path)
    assert counter.calls == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_no_cache_without_key_parts_or_dir(accelerator, reference, tmp_path):
    for cache_dir, parts in ((tmp_path, None), (None, {"model": "x"})):
        ds = precompute_reference_logps(
            accelerator, reference, pairs_dataset(4), PreferenceCollator(PAD), batch_size=2,
            chunked=True, chunk_size=5, cache_dir=cache_dir, cache_key_parts=parts)
        assert ref_columns(ds).shape == (2, 4)
    assert not list(tmp_path.iterdir())


def test_reference_key_parts_follow_the_model_files(tmp_path):
    reference = tiny_qwen3(VOCAB, seed=3)
    reference.save_pretrained(tmp_path)
    parts = reference_key_parts(str(tmp_path), dtype="float32")
    assert parts["dtype"] == "float32"
    assert {name for name, *_ in parts["model_files"]} >= {"config.json", "model.safetensors"}
    assert reference_key_parts(str(tmp_path), dtype="float32") == parts
    weights = tmp_path / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten weights
    assert reference_key_parts(str(tmp_path), dtype="float32") != parts
    assert reference_key_parts(str(tmp_path / "missing")) is None


def test_an_adapter_is_keyed_with_its_base(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    tiny_qwen3(VOCAB, seed=3).save_pretrained(base)
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({"base_model_name_or_path": str(base)}))
    parts = reference_key_parts(str(adapter), dtype="float32")
    assert parts["base"] == reference_key_parts(str(base))
    for unidentifiable in (str(tmp_path / "missing"), None, str(adapter)):  # the last: a loop
        config.write_text(json.dumps({"base_model_name_or_path": unidentifiable}))
        assert reference_key_parts(str(adapter)) is None


# Every module whose code computes or arranges the cached values (not one fewer).
VALUE_MODULES = ["dpo.model.forward", "dpo.model.probes", "dpo.model.padding_probe",
                 "dpo.model.logprobs", "dpo.model.packed_attention", "dpo.loss.variants",
                 "dpo.data.batching",
                 "dpo.model.loading", "dpo.model.lora", "dpo.train.reference_cache",
                 "dpo.train.reference_key"]


@pytest.mark.parametrize("name", VALUE_MODULES)
def test_the_key_covers_the_code_that_shapes_the_values(accelerator, tmp_path, monkeypatch,
                                                        name):
    """An edit to any of these modules misses the cache."""
    def key():
        return cache_key(accelerator, pairs_dataset(2), chunked=True, chunk_size=5,
                         batching=(3,), cache_key_parts={"model": "m"})

    before, module = key(), importlib.import_module(name)
    edited = tmp_path / "edited.py"
    edited.write_text(Path(module.__file__).read_text() + "\n# edited\n")
    monkeypatch.setattr(module, "__file__", str(edited))
    assert key() != before


def test_data_digest_needs_tokenized_rows_and_sees_order():
    ds = pairs_dataset()
    assert data_digest(ds) == data_digest(pairs_dataset())
    assert data_digest(ds) != data_digest(ds.select(range(1, len(ds))))
    assert data_digest(ds) != data_digest(ds.shuffle(seed=0))
    with pytest.raises(ValueError, match="tokenize_preferences"):
        data_digest(ds.remove_columns("chosen_labels"))


def test_the_key_covers_a_vision_rows_image_bytes_and_the_processor(accelerator):
    """The same tokens with other pictures are other values; so is another image processor."""
    from types import SimpleNamespace

    ds = pairs_dataset()
    with_images = lambda payloads: ds.add_column(  # noqa: E731
        "images", [[{"bytes": p, "path": None}] for p in payloads])
    one = with_images([bytes([i]) * 3 for i in range(len(ds))])
    assert data_digest(one) == data_digest(with_images([bytes([i]) * 3 for i in range(len(ds))]))
    assert data_digest(one) != data_digest(ds)
    assert data_digest(one) != data_digest(with_images([b"x" * 3] * len(ds)))
    # the row boundaries count: the same bytes split otherwise are other images
    assert data_digest(with_images([b"ab", b"c"] + [b""] * (len(ds) - 2))) != data_digest(
        with_images([b"a", b"bc"] + [b""] * (len(ds) - 2)))

    def processor(size):
        return SimpleNamespace(to_json_string=lambda: "{}", chat_template="t",
                               image_processor=SimpleNamespace(to_json_string=lambda: size))

    key = lambda p: cache_key(accelerator, one, chunked=True, chunk_size=8,  # noqa: E731
                              batching=(), cache_key_parts={"m": 1}, processor=p)
    assert key(processor("28")) == key(processor("28")) != key(processor("56")) != key(None)


def test_config_flag_is_off_by_default_and_refused_without_a_reference():
    assert TrainConfig().precompute_ref_logps is False
    assert TrainConfig(precompute_ref_logps=True).precompute_ref_logps is True
    with pytest.raises(ConfigError, match="precompute_ref_logps: loss_type simpo"):
        TrainConfig(precompute_ref_logps=True, loss_type="simpo")


@pytest.mark.slow
def test_a_restart_reuses_the_cache_and_trains_the_same(tmp_path):
    """The first run computes and caches; a second run (a restart, another output dir) reads
    the cache, runs no reference pass, and trains to the same weights bit for bit."""
    env = demo_env(chat_model_cache(tmp_path / "cache"))  # the demo's chat model, built once
    flags = ["--config", "configs/demo.yaml", "--num-samples", "40", "--eval-samples", "8",
             "--max-steps", "3", "--precompute-ref-logps", "--num-sample-generations", "0",
             "--judge", "none"]
    first = run_train(env, *flags, "--output-dir", str(tmp_path / "a"))
    again = run_train(env, *flags, "--output-dir", str(tmp_path / "b"))
    assert first.stdout.count("pairs computed in") == 2  # train and eval
    assert "pairs computed in" not in again.stdout
    assert again.stdout.count("pairs from cache") == 2
    assert len(list((tmp_path / "cache" / "ref-logps").glob("ref-logps-*.safetensors"))) == 2
    assert weights_equal(tmp_path / "b", tmp_path / "a")


# --- An adapter's base is part of what the reference is ---------------------------------------

def save_adapter_on(base_dir, adapter_dir, tokenizer):
    """A LoRA adapter (B random: it changes the model) on the model saved at `base_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)


# How the adapter enters the run: `--model A` (a frozen copy of A is the reference), `--model A
# --lora-r 2` (A merged into its base), `--ref-model A` (A merged, beside another policy).
ADAPTER_USES = {"start": {}, "start+lora": {"lora_r": 2}, "ref-model": {"ref_model": "adapter"}}


@pytest.mark.parametrize("use", list(ADAPTER_USES))
def test_an_adapter_reference_misses_when_its_base_is_rewritten(accelerator, tmp_path,
                                                                  monkeypatch, tiny_tokenizer,
                                                                  use):
    """The base rewritten with other weights at the same path: the values are recomputed (and
    equal a run without a cache), not read back from the first run's file."""
    pytest.importorskip("peft")
    from dpo.model.loading import load_policy_and_reference
    from dpo.train.reference_cache import precompute_for_run

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    tiny_qwen3(VOCAB, seed=3).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    save_adapter_on(base, adapter, tiny_tokenizer)
    settings = {k: str(adapter) if v == "adapter" else v for k, v in ADAPTER_USES[use].items()}
    cfg = TrainConfig(model=str(base if "ref_model" in settings else adapter),
                      precompute_ref_logps=True, output_dir=str(tmp_path / "out"), **settings)

    def values(cache):
        monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / cache))
        _, reference = load_policy_and_reference(cfg, cfg.model)
        ds, _ = precompute_for_run(accelerator, cfg, reference, cfg.model, pairs_dataset(4),
                                   None, PreferenceCollator(PAD))
        return ref_columns(ds)

    first = values("cache")
    tiny_qwen3(VOCAB, seed=4).save_pretrained(base)  # other weights, same path and size
    again = values("cache")
    assert (again - first).abs().max() > 1e-2
    assert torch.equal(again, values("fresh-cache"))
