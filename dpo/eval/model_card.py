"""The output directory's `README.md`: a model card that says what was trained from what.

With LoRA, peft's `save_pretrained` writes a `README.md` of its own first (its metadata:
`library_name: peft`, `base_model`, tags; and a "Framework versions" line) and, when one exists,
loads and updates it rather than replacing it. So the card is written after the model: peft's
metadata is kept and ours added to it, and its "Framework versions" section is kept below our
text. A later peft save into the same directory updates this card in turn.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from dpo.config import TrainConfig, default_of

CARD = "README.md"
# The settings that shape the objective, which the card lists when they differ from their
# defaults, with the method each one turns on.
LOSS_SETTINGS = {"loss_weights": "MPO", "label_smoothing": None, "simpo_gamma": None,
                 "discopop_tau": None, "f_divergence_type": "f-DPO",
                 "f_alpha_divergence_coef": None, "bco_baseline": None,
                 "use_weighting": "WPO", "ld_alpha": "LD-DPO", "router_aux_loss_coef": None,
                 "sync_ref_model": "TR-DPO", "ref_model_mixup_alpha": None,
                 "ref_model_sync_steps": None, "precompute_ref_logps": None,
                 "desirable_weight": None, "undesirable_weight": None, "ranking_loss": None}
OPTIM_SETTINGS = ("learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay",
                  "max_grad_norm", "batch_size", "gradient_accumulation_steps", "max_length",
                  "seed")
SHOWN_METRICS = ("eval/loss", "eval/rewards/accuracies", "eval/kl", "eval/rewards/margins",
                 "eval/win_rate", "eval/reward/policy", "eval/reward/reference",
                 "eval/length/policy", "eval/length/reference")


def write(output_dir: Path, cfg: TrainConfig, results: dict, steps: int, num_processes: int,
          train_ds, eval_ds, argv: list[str] | None = None) -> Path:
    """Write (or update, keeping peft's metadata) `<output_dir>/README.md` of a run of `steps`
    optimizer steps on `train_ds` (eval: `eval_ds` or None, `results`); return its path."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(output_dir) / CARD
    card = (ModelCard.load(path) if path.is_file()
            else ModelCard(f"---\n{ModelCardData(library_name='transformers').to_yaml()}\n---\n"))
    tags = set(card.data.tags or []) | {"dpo", "preference-optimization"}
    card.data.tags = sorted(tags)
    if not card.data.base_model and not cfg.model.startswith("builtin:"):
        card.data.base_model = cfg.model
    datasets = [d for d in cfg.dataset if not d.startswith("builtin:") and not Path(d).exists()]
    if datasets:
        card.data.datasets = datasets
    if not card.data.pipeline_tag:
        card.data.pipeline_tag = "text-generation"
    kept = _section(card.text, "### Framework versions")
    card.text = model_card_text(cfg, results, steps=steps, train_rows=len(train_ds),
                                eval_rows=len(eval_ds) if eval_ds is not None else 0,
                                num_processes=num_processes,
                                argv=sys.argv if argv is None else argv,
                                ranked="stages" in getattr(train_ds, "column_names", ())) + kept
    card.save(path)
    return path


def model_card_text(cfg: TrainConfig, results: dict, *, steps: int, train_rows: int,
                    eval_rows: int, num_processes: int, argv: list[str], ranked: bool = False
                    ) -> str:
    """The card's text; `ranked`: the training rows are rankings of N responses."""
    from dpo.config.model import is_adapter_dir, uses_peft

    rows = "rankings" if ranked else _rows(cfg)

    peft = uses_peft(cfg)
    name = Path(cfg.output_dir).name
    reference = ("none (a reference-free loss)" if not _needs_reference(cfg)
                 else f"`{cfg.ref_model}`" if cfg.ref_model
                 else f"`{cfg.model}` with the adapter off" if peft
                 else f"`{cfg.model}` (frozen copy of the base model)")
    if cfg.sync_ref_model:
        reference += (f", moved towards the policy every {cfg.ref_model_sync_steps} steps "
                      f"(TR-DPO, α = {cfg.ref_model_mixup_alpha})")
    what = ("a LoRA adapter" + (f" (r = {cfg.lora_r}, α = {cfg.lora_alpha})" if cfg.lora_r
                                else " (trained further from the adapter it started from)")
            if peft else "all weights (full fine-tuning)")
    lines = [
        f"# {name}",
        "",
        f"`{cfg.model}` trained with {_method(cfg, ranked)} with the `dpo` trainer "
        "(`train.py`).",
        "",
        "## Training",
        "",
        f"- Base model: `{cfg.model}`" + (" (a PEFT adapter; its base is in its "
                                          "adapter_config.json)" if is_adapter_dir(cfg.model)
                                          else ""),
        f"- Trained: {what}",
        f"- Reference: {reference}",
        f"- Data: {', '.join(f'`{d}`' for d in cfg.dataset)} (split "
        f"{', '.join(cfg.split)}): {train_rows} training {rows}, {eval_rows} held-out eval "
        f"{rows}"
        + (f" (weights {cfg.dataset_weights})" if cfg.dataset_weights else ""),
        _loss_line(cfg),
        f"- Steps: {steps} optimizer steps, {num_processes} process(es); "
        + ", ".join(f"{k} = {getattr(cfg, k)}" for k in OPTIM_SETTINGS),
        "",
        *_best_lines(cfg, results, steps),
        f"## Evaluation (held-out {rows.split()[0]}, "
        + (f"step {results['step']}: the saved model's weights)" if "step" in results
           else "end of training)"),
        "",
    ]
    best = results.get("metric_for_best_model")
    shown = [k for k in (*SHOWN_METRICS, *([best] if best not in SHOWN_METRICS else []))
             if k in results]
    if shown:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {results[k]:.4f} |" for k in shown]
        if "eval/win_rate" in results:
            lines += ["", f"Win rate: the policy's answers to {cfg.num_sample_generations} eval "
                      f"prompts against the reference's, scored by `{cfg.judge}` (a tie counts "
                      "half)."]
    else:
        lines.append("No eval data.")
    launcher = "python" if num_processes == 1 else f"accelerate launch --num_processes " \
        f"{num_processes}"
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"{launcher} train.py --config {Path(cfg.output_dir) / 'training_config.yaml'}",
        "```",
        "",
        "(`training_config.yaml` holds every setting of this run; it was started as "
        f"`{shlex.join(['train.py', *argv[1:]])}`.)",
        "",
    ]
    return "\n".join(lines)


# Methods that are not DPO, named as their papers name them (a mixture is DPO's family).
METHODS = {"kto": "Kahneman-Tversky Optimization", "orpo": "Odds Ratio Preference Optimization",
           "sft": "supervised fine-tuning on the chosen responses"}


def _method(cfg: TrainConfig, ranked: bool = False) -> str:
    if ranked:  # rankings train with sigmoid alone (dpo.train.loaders.check_ranked_run)
        return ("Plackett–Luce DPO over rankings (sigmoid, ranking_loss plackett_luce)"
                if cfg.ranking_loss == "plackett_luce"
                else "Direct Preference Optimization over the ordered pairs of rankings "
                "(sigmoid, ranking_loss all_pairs)")
    if len(cfg.loss_type) == 1 and cfg.loss_type[0] in METHODS:
        return f"{METHODS[cfg.loss_type[0]]} ({cfg.loss_type[0]})"
    return f"Direct Preference Optimization ({' + '.join(cfg.loss_type)})"


def _rows(cfg: TrainConfig) -> str:
    """What a training row is: a pair, or KTO's labelled completion."""
    return "rows (labelled completions)" if cfg.loss_type == ["kto"] else "pairs"


def _loss_line(cfg: TrainConfig) -> str:
    """`- Loss: ...`: the loss types, β and every loss setting away from its default (a loss's
    own default label smoothing too: it shapes the objective as much as a given one)."""
    from dpo.loss import LOSSES

    settings = [f"{k} = {getattr(cfg, k)}" + (f" ({tag})" if tag else "")
                for k, tag in LOSS_SETTINGS.items() if getattr(cfg, k) != default_of(k)]
    if cfg.label_smoothing is None:
        settings += [f"label_smoothing = {LOSSES[t].default_smoothing} ({t}'s default)"
                     for t in cfg.loss_type if LOSSES[t].default_smoothing]
    return f"- Loss: {', '.join(cfg.loss_type)}, β = {cfg.beta}" + "".join(
        f", {s}" for s in settings)


def _best_lines(cfg: TrainConfig, results: dict, steps: int) -> list[str]:
    """`## Which weights`, with `--metric-for-best-model` (its fields in `results`, from
    `dpo.train.best.BestCheckpoint.finish`): the best step, its value, the rule, and which step
    the saved model is."""
    if "best_step" not in results:
        return []
    metric, direction = results["metric_for_best_model"], (
        "higher" if results["greater_is_better"] else "lower")
    given = " (its default)" if cfg.greater_is_better is None else ""
    lines = ["## Which weights", "",
             f"- Selection: `{metric}`, {direction} is better{given}, compared at the evals of "
             f"the saved checkpoints (every {cfg.save_steps} step{'s' * (cfg.save_steps > 1)}) and "
             "of the final step; a "
             "tie keeps the earlier step."]
    if results["best_step"] is None:
        lines.append(f"- Best: none (no eval gave `{metric}` a value)")
    else:
        where = (f"`{results['best_checkpoint']}`" if results["best_checkpoint"]
                 else "the final weights, not a checkpoint")
        lines.append(f"- Best: step {results['best_step']} ({where}), `{metric}` = "
                     f"{results['best_metric']:.4f}")
    saved = results["step"]
    lines.append(f"- Saved model: step {saved}" + (
        ", the best checkpoint's weights (`--load-best-model-at-end`)"
        if results["load_best_model_at_end"] and saved != steps
        else ", the final step, which is the best" if saved == results["best_step"]
        else f", the final step (without `--load-best-model-at-end`; the best is step "
             f"{results['best_step']})" if results["best_step"] is not None
        else ", the final step"))
    return [*lines, ""]


def _needs_reference(cfg: TrainConfig) -> bool:
    from dpo.loss import needs_reference

    return needs_reference(cfg.loss_type)


def _section(text: str, heading: str) -> str:
    """`heading` and what follows it up to the next heading of its level or above, else ""."""
    lines = text.splitlines()
    if heading not in lines:
        return ""
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")
                and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    return "\n" + "\n".join(lines[start:end]) + "\n"
