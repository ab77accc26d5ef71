"""Evaluate a saved model, adapter or checkpoint against a reference, without training.

    python -m dpo.evaluate --model outputs/demo --judge builtin:demo-rule
    python -m dpo.evaluate --model outputs/demo/checkpoint-125
    python -m dpo.evaluate --model my/model --ref-model my/sft-model --dataset data.jsonl
    accelerate launch --multi_gpu -m dpo.evaluate --model outputs/demo

The settings are train.py's (`TrainConfig`, the same flags). When `--model` is a run's output
directory, or a `checkpoint-<step>` in one, that run's `training_config.yaml` gives the defaults
(data and eval split, loss and β, lengths, batch sizes) and its reference is the reference, so the
metrics are the run's own eval at that point; flags override any of them. A PEFT adapter is
compared with its base (the adapter off), as training compared it; any other model needs
`--ref-model` unless the loss is reference-free.

Writes `eval_results.json`, `metrics.jsonl` and `samples.jsonl` to `--output-dir` (default:
`<model>/eval`) and prints the table train.py prints at its end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accelerate.utils import DistributedType, set_seed

from dpo import demo
from dpo.model import lora
from dpo.train import checkpoint
from dpo.config import ConfigError, TrainConfig, load_config
from dpo.config.model import adapter_base, is_adapter_dir, uses_peft
from dpo.eval.evaluation import Evaluator, generate_answers, sample_images, sample_prompts
from dpo.model.probes import settle_logps_path
from dpo.train.loaders import build_datasets, eval_loader_of, make_collator
from dpo.loss import needs_reference
from dpo.train.metrics import MetricsLogger
from dpo.model.loading import (load_causal_lm, load_reference_model,
                               load_tokenizer_and_processor, prepare_reference)
from dpo.train.runtime import make_accelerator

RUN_CONFIG = "training_config.yaml"
RESULTS = ("eval_results.json", "metrics.jsonl", "samples.jsonl")  # what a rerun replaces


def main(argv: list[str] | None = None) -> None:
    try:
        cfg, source = evaluate_config(sys.argv[1:] if argv is None else list(argv))
        run(cfg, source)
    except ConfigError as e:
        sys.exit(f"error: {e}")


class Source:
    """What `--model` is: a checkpoint (its run's base model plus saved weights), a PEFT adapter,
    or a model; the run it belongs to, if any, and the step it was saved at."""

    def __init__(self, model: str):
        path = Path(model).expanduser()
        self.checkpoint = (path if checkpoint.CHECKPOINT_RE.match(path.name)
                           and (path / checkpoint.STATE_FILE).is_file() else None)
        run_dir = path.parent if self.checkpoint else path
        self.run_dir = run_dir if (run_dir / RUN_CONFIG).is_file() else None
        self.adapter = is_adapter_dir(model)
        self.step = (json.loads((path / checkpoint.STATE_FILE).read_text())["step"]
                     if self.checkpoint else _last_step(self.run_dir))
        self.trained: TrainConfig | None = None  # the run's own config


def evaluate_config(argv: list[str]) -> tuple[TrainConfig, Source]:
    """The TrainConfig of an evaluation: the run's config under the flags, and the source."""
    given = argparse.ArgumentParser(add_help=False)
    for flag in ("--model", "--config", "--output-dir", "--ref-model"):
        given.add_argument(flag)
    known, _ = given.parse_known_args(argv)
    if "-h" in argv or "--help" in argv:
        load_config(["--help"])
    if known.model is None:
        raise ConfigError("model: give --model, the model, adapter, checkpoint or run output "
                          "directory to evaluate")
    source = Source(known.model)
    if source.checkpoint and source.run_dir is None:
        raise ConfigError(f"model {known.model}: a checkpoint outside its run's output directory "
                          f"(no {RUN_CONFIG} beside it names the model it was trained from)")
    if source.run_dir is not None:
        source.trained = load_config(["--config", str(source.run_dir / RUN_CONFIG)])
        if known.config is None:
            argv = ["--config", str(source.run_dir / RUN_CONFIG), *argv]
    # Nothing is trained: no best checkpoint to pick (its settings need what an evaluation drops).
    cfg = load_config(argv, metric_for_best_model=None, greater_is_better=None,
                      load_best_model_at_end=False)
    # Nothing is trained: no adapter to add, no reference to precompute or to move.
    cfg.lora_r, cfg.lora_target_modules, cfg.lora_modules_to_save = 0, None, None
    cfg.merge_adapter = cfg.precompute_ref_logps = cfg.sync_ref_model = False
    cfg.resume_from_checkpoint, cfg.overwrite_output_dir = None, False
    trained = source.trained
    if known.ref_model is None and trained is not None:
        if trained.sync_ref_model:
            raise ConfigError(f"model {known.model}: its run moved the reference as it trained "
                              "(sync_ref_model), which is not saved; give --ref-model")
        cfg.ref_model = training_reference(trained)
    elif known.ref_model is None and not source.adapter and needs_reference(cfg.loss_type):
        raise ConfigError(f"ref_model: give --ref-model, the reference to compare {known.model} "
                          f"with (loss_type {', '.join(cfg.loss_type)} needs one)")
    if known.output_dir is None:
        if not Path(known.model).expanduser().is_dir():
            raise ConfigError(f"output_dir: give --output-dir ({known.model} is no local "
                              "directory to write the results beside)")
        cfg.output_dir = str(Path(known.model).expanduser() / "eval")
    if (Path(cfg.output_dir) / RUN_CONFIG).is_file():
        raise ConfigError(f"output_dir {cfg.output_dir} holds a training run; evaluation writes "
                          "elsewhere (default: <model>/eval)")
    return cfg, source


def training_reference(trained: TrainConfig) -> str | None:
    """The `--ref-model` that stands for a run's reference; None: the adapter off.

    A run with `--ref-model` had that; a LoRA run from a base model had the base (the adapter
    off; a start adapter merged into it is the saved base); one that trained a start adapter
    further had that adapter as it started; full fine-tuning, the model it started from."""
    if trained.ref_model is not None:
        return trained.ref_model
    if uses_peft(trained):
        return trained.model if is_adapter_dir(trained.model) and not trained.lora_r \
            else None
    return trained.model


def run(cfg: TrainConfig, source: Source) -> dict:
    """Evaluate; write the results; return them (on every process)."""
    accelerator = make_accelerator(cfg)
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                            DistributedType.MULTI_GPU):
        raise ConfigError(f"dpo.evaluate runs on one process or under DDP (accelerate launch "
                          f"--multi_gpu), not {accelerator.distributed_type.value}")
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # builds the offline demo model once
        base = demo.resolve_model(source.trained.model if source.checkpoint else cfg.model)
    tokenizer, processor = load_tokenizer_and_processor(cfg, base)  # processor: a vision model's
    _, eval_ds = build_datasets(cfg, accelerator, tokenizer, processor)
    if eval_ds is None or len(eval_ds) == 0:
        raise ConfigError(f"dataset {', '.join(cfg.dataset)}: no eval pairs to evaluate on (set "
                          "--eval-split, or --eval-samples above 0, or check the filter report "
                          "above)")
    policy, reference = load_models(cfg, source, base)
    policy = policy.to(accelerator.device)
    reference = prepare_reference(accelerator, reference)
    cfg = settle_logps_path(accelerator, cfg, policy, reference)
    collate = make_collator(cfg, tokenizer, processor)  # packing or padding, as training settled it
    eval_loader = accelerator.prepare(eval_loader_of(cfg, eval_ds, collate))
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for name in RESULTS:
            (out / name).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    prompts, images = sample_prompts(cfg, eval_ds), sample_images(cfg, eval_ds)
    ref_answers = None if reference is None else generate_answers(
        accelerator, cfg, reference, tokenizer, prompts, images, processor)
    accelerator.init_trackers("dpo-eval", config={k: str(v) for k, v in vars(cfg).items()})
    logger = MetricsLogger(accelerator, out, total_steps=0)
    logger.progress.close()  # no steps to count; its write() still prints the samples
    evaluator = Evaluator(accelerator, cfg, logger, tokenizer, eval_loader, prompts, ref_answers,
                          images=images, processor=processor)
    results = evaluator.run(policy, reference, source.step)
    if accelerator.is_main_process:
        (out / "eval_results.json").write_text(json.dumps(results, indent=2))
        print(evaluator.summary({}, results), flush=True)
    accelerator.end_training()
    return results


def load_models(cfg: TrainConfig, source: Source, base: str):
    """`(policy, reference or None)`, frozen, as training held them: a checkpoint's weights
    loaded into its run's model; an adapter on its base, the reference its base (adapter off)
    unless `--ref-model` names another; a model as it is."""
    from safetensors.torch import load_file

    trained = source.trained
    if source.checkpoint and uses_peft(trained):
        policy, reference = lora.load_peft_policy(trained, base, load_causal_lm)
    elif source.adapter:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(load_causal_lm(cfg, adapter_base(base)),
                                               base)
        policy, reference = peft_model.get_base_model(), lora.AdapterOffReference(peft_model)
    else:
        policy, reference = load_causal_lm(cfg, base), None
    if source.checkpoint:
        weights = source.checkpoint / "model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"model {source.checkpoint}: no model.safetensors (a DeepSpeed or "
                              "FSDP checkpoint keeps its weights sharded); evaluate the run's "
                              "output directory instead")
        state = load_file(str(weights))
        mine = policy.state_dict()
        # Tied weights (an LM head that is the embedding) are saved once, under either name.
        shared: dict[int, list[str]] = {}
        for name, tensor in mine.items():
            shared.setdefault(tensor.data_ptr(), []).append(name)
        saved = {n for names in shared.values() if set(names) & state.keys() for n in names}
        wrong = sorted(k for k in state.keys() & mine.keys() if state[k].shape != mine[k].shape)
        missing, unexpected = sorted(mine.keys() - saved), sorted(state.keys() - mine.keys())
        if wrong or missing or unexpected:
            raise ConfigError(f"model {source.checkpoint}: its weights are not those of "
                              f"{trained.model}, the run's model ({len(wrong)} of other shapes, "
                              f"{len(missing)} missing, {len(unexpected)} unexpected, e.g. "
                              f"{(wrong or missing or unexpected)[0]}); a checkpoint from another "
                              "model?")
        policy.load_state_dict(state, strict=False)  # checked above, tied weights aside
    if not needs_reference(cfg.loss_type):
        reference = None
    elif cfg.ref_model is not None:
        reference = load_reference_model(cfg, base)
    for model in (policy, reference):
        if model is not None:
            model.eval()
            model.requires_grad_(False)
    return policy, reference


def _last_step(run_dir: Path | None) -> int:
    """The step of a run's saved model: the `step` its eval_results.json names (an earlier,
    best step with --load-best-model-at-end), else the last step it logged (its final eval's);
    0 without a run."""
    results = run_dir and run_dir / "eval_results.json"
    if results and results.is_file() and "step" in json.loads(results.read_text()):
        return json.loads(results.read_text())["step"]
    path = run_dir and run_dir / "metrics.jsonl"
    if not path or not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


if __name__ == "__main__":
    main()
