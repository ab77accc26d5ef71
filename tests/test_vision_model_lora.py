"""A vision-language policy's vision tower: frozen by default (`--freeze-vision-tower`), left out
of LoRA unless trained, an adapter-off reference with its tower's adapter off too, and gradient
checkpointing in a training step (tests/vision_models.py's tiny checkpoints)."""
import pytest
import torch

from dpo.config import TrainConfig, load_config
from dpo.model.forward import concatenated_forward
from dpo.model.loading import load_policy_and_reference
from tests.vision_models import collate, encode_pairs, load_tiny_vision, tiny_vision_model_dir

peft = pytest.importorskip("peft")
FAMILIES = ["qwen2_5_vl", "gemma3"]
VISION = (".visual.", ".vision_tower.", ".multi_modal_projector.")

pytestmark = pytest.mark.shared  # the ../shared tokenizers


def load(family: str, **settings):
    path = str(tiny_vision_model_dir(family))
    cfg = TrainConfig(model=path, output_dir="unused", **settings)
    return load_policy_and_reference(cfg, path)


def is_vision(name: str) -> bool:
    return any(part in "." + name + "." for part in VISION)


def logps(model, batch) -> torch.Tensor:
    out = concatenated_forward(model, batch, chunk_size=8)
    return torch.cat([out.chosen_logps, out.rejected_logps])


def test_the_flag_is_a_bool_defaulting_to_true():
    assert load_config(["--model", "m"]).freeze_vision_tower is True
    # as every bool flag: --no-X sets it false (or `freeze_vision_tower: false` in YAML)
    assert load_config(["--model", "m", "--no-freeze-vision-tower"]).freeze_vision_tower is False


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_freezes_the_tower_and_projector(family):
    """(Unless told: test_gradient_checkpointing_... trains every parameter.)"""
    policy, _ = load(family, loss_type="simpo")  # no reference to load
    trains = {n for n, p in policy.named_parameters() if p.requires_grad}
    vision = {n for n, _ in policy.named_parameters() if is_vision(n)}
    assert any("merger" in n or "multi_modal_projector" in n for n in vision)
    assert trains == {n for n, _ in policy.named_parameters()} - vision


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_leaves_the_tower_out_unless_it_trains(family):
    adapted = {}
    for freeze in (True, False):
        policy, _ = load(family, lora_r=2, freeze_vision_tower=freeze)
        adapted[freeze] = [n for n, m in policy.named_modules() if hasattr(m, "lora_A")]
        trains = [n for n, p in policy.named_parameters() if p.requires_grad]
        assert all("lora_" in n for n in trains)
    assert len(adapted[True]) == 14 and not any(is_vision(n) for n in adapted[True])  # 2 × 7
    tower = [n for n in adapted[False] if is_vision(n)]
    assert tower and adapted[False] == sorted(adapted[True] + tower, key=adapted[False].index)
    # named targets are kept off the frozen tower too (SigLIP's attention has q_proj as well)
    policy, _ = load(family, lora_r=2, lora_target_modules=["q_proj"])
    assert [n for n, m in policy.named_modules() if hasattr(m, "lora_A")] == \
        [n for n in adapted[True] if n.endswith("q_proj")]


def test_the_adapter_off_reference_runs_the_tower_without_its_adapter():
    """With the tower adapted (--freeze-vision-tower false), the reference = the base model:
    its image features too are computed with the adapter off."""
    processor, base = load_tiny_vision("qwen2_5_vl")
    batch = collate(encode_pairs(processor))
    policy, reference = load("qwen2_5_vl", lora_r=2, freeze_vision_tower=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name and ".visual." in name:  # only the tower's adapter differs
                p.copy_(torch.randn(p.shape, generator=generator))
        want = logps(base, batch)
        torch.testing.assert_close(logps(reference, batch), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logps(policy.eval(), batch), want, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients_in_a_training_step(family):
    """Tower trained (the demanding case): a training-mode step's gradients with activation
    checkpointing (text layers and vision blocks) equal those without."""
    processor, _ = load_tiny_vision(family)
    batch = collate(encode_pairs(processor)[:2])
    grads = []
    for checkpointing in (False, True):
        policy, _ = load(family, freeze_vision_tower=False, loss_type="simpo",
                         gradient_checkpointing=checkpointing)
        policy.train()
        assert all(p.requires_grad for p in policy.parameters())  # --no-freeze-vision-tower
        on = {n for n, m in policy.named_modules() if getattr(m, "gradient_checkpointing", 0)}
        assert bool(on) == checkpointing and (not on or any(is_vision(n + ".") for n in on))
        logps(policy, batch).sum().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(is_vision(n) for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: n + m)
