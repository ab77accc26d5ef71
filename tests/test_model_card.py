"""The output directory's README.md: what was trained from what, and peft's card kept."""
import json

import pytest

from dpo.eval import model_card
from dpo.config import TrainConfig
from tests.e2e import demo_run

RESULTS = {"eval/loss": 0.01, "eval/rewards/accuracies": 0.99, "eval/rewards/margins": 7.5,
           "eval/win_rate": 0.875, "eval/reward/policy": 0.9, "eval/reward/reference": 0.1}


@pytest.mark.slow
def test_demo_run_has_a_model_card():
    """Base model, reference, data with row counts, loss and settings, steps, final eval
    metrics with the win rate, and the command that reproduces the run."""
    out, _ = demo_run()
    card = (out / "README.md").read_text()
    final = json.loads((out / "eval_results.json").read_text())
    assert card.startswith("---\n") and "- dpo" in card  # hub metadata (tags)
    for text in ("Base model: `builtin:tiny-qwen3-chat`", "Reference: `builtin:tiny-qwen3-chat`",
                 "`builtin:demo-preferences` (split train): 4000 training pairs, 256 held-out",
                 "Loss: sigmoid, β = 0.3", "250 optimizer steps", "learning_rate = 0.0003",
                 f"| eval/win_rate | {final['eval/win_rate']:.4f} |",
                 f"| eval/rewards/accuracies | {final['eval/rewards/accuracies']:.4f} |",
                 "scored by `builtin:demo-rule`",
                 f"python train.py --config {out / 'training_config.yaml'}"):
        assert text in card, text


def test_card_beside_peft_keeps_both(tmp_path):
    """peft writes its README.md (metadata, framework versions) with the adapter; the card is
    written after it and keeps what peft wrote; a later peft save keeps the card."""
    from peft import LoraConfig, get_peft_model

    from dpo.demo.tiny import tiny_qwen3

    model = get_peft_model(tiny_qwen3(64), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    peft_card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in peft_card and "- PEFT " in peft_card
    cfg = TrainConfig(model="Qwen/Qwen3-0.6B", dataset=["data/pairs.jsonl"], lora_r=8,
                      output_dir=str(tmp_path), judge="builtin:demo-rule")
    model_card.write(tmp_path, cfg, RESULTS, 120, 2, range(900), range(100),
                     argv=["train.py", "--lora-r", "8"])
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "- PEFT " in card  # peft's, kept
    assert "base_model: Qwen/Qwen3-0.6B" in card
    for text in ("Trained: a LoRA adapter (r = 8, α = 16.0)",
                 "Reference: `Qwen/Qwen3-0.6B` with the adapter off",
                 "900 training pairs, 100 held-out eval pairs", "120 optimizer steps, 2 process",
                 "| eval/win_rate | 0.8750 |", "accelerate launch --num_processes 2 train.py",
                 "`train.py --lora-r 8`"):
        assert text in card, text
    model.save_pretrained(tmp_path)  # peft updates the card it finds, keeping ours
    again = (tmp_path / "README.md").read_text()
    assert "Reference: `Qwen/Qwen3-0.6B` with the adapter off" in again
    assert again.count("- PEFT ") == 1


@pytest.mark.parametrize("options, texts", [
    (dict(use_weighting=True), ["use_weighting = True (WPO)"]),
    (dict(ld_alpha=0.5), ["ld_alpha = 0.5 (LD-DPO)"]),
    (dict(loss_type=["sigmoid"], rpo_alpha=0.5, f_divergence_type="alpha_divergence",
          f_alpha_divergence_coef=0.3),
     ["Loss: sigmoid, sft, β = 0.1", "loss_weights = [1.0, 0.5] (MPO)",
      "f_divergence_type = alpha_divergence (f-DPO)", "f_alpha_divergence_coef = 0.3"]),
    (dict(loss_type=["exo_pair"]), ["label_smoothing = 0.001 (exo_pair's default)"]),
    (dict(router_aux_loss_coef=0.01), ["router_aux_loss_coef = 0.01"]),
])
def test_the_loss_line_names_every_setting_that_shapes_the_objective(options, texts):
    """A WPO or LD-DPO run is not "Loss: sigmoid" alone."""
    cfg = TrainConfig(model="tiny", dataset="none", **options)
    card = model_card.model_card_text(cfg, {}, steps=1, train_rows=1, eval_rows=0,
                                      num_processes=1, argv=["train.py"])
    line = next(x for x in card.splitlines() if x.startswith("- Loss: "))
    for text in texts:
        assert text in line, line


@pytest.mark.parametrize("loss_type, method, rows", [
    (["sigmoid"], "Direct Preference Optimization (sigmoid)", "pairs"),
    (["sigmoid", "sft"], "Direct Preference Optimization (sigmoid + sft)", "pairs"),
    (["kto"], "Kahneman-Tversky Optimization (kto)", "rows (labelled completions)"),
    (["orpo"], "Odds Ratio Preference Optimization (orpo)", "pairs"),
])
def test_the_card_names_the_method_and_what_a_row_is(loss_type, method, rows):
    from dpo.eval.model_card import model_card_text

    cfg = TrainConfig(model="m", dataset="d", loss_type=loss_type)
    card = model_card_text(cfg, {"eval/loss": 0.5}, steps=3, train_rows=8, eval_rows=2,
                           num_processes=1, argv=["train.py"])
    assert f"`m` trained with {method} with the `dpo` trainer" in card
    assert f"8 training {rows}, 2 held-out eval {rows}" in card


@pytest.mark.parametrize("ranking_loss, method", [
    ("plackett_luce", "Plackett–Luce DPO over rankings (sigmoid, ranking_loss plackett_luce)"),
    ("all_pairs", "Direct Preference Optimization over the ordered pairs of rankings"),
])
def test_the_card_of_rankings_says_so(ranking_loss, method):
    from dpo.eval.model_card import model_card_text

    cfg = TrainConfig(model="m", dataset="d", ranking_loss=ranking_loss)
    card = model_card_text(cfg, {"eval/loss": 0.5}, steps=3, train_rows=8, eval_rows=2,
                           num_processes=1, argv=["train.py"], ranked=True)
    assert f"`m` trained with {method}" in card
    assert "8 training rankings, 2 held-out eval rankings" in card
    assert "## Evaluation (held-out rankings," in card
