"""Direct Preference Optimization of a causal LM, on Accelerate.

    python train.py --config configs/demo.yaml                      # one process
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config ...
    torchrun --nproc_per_node 2 train.py --config ...

The loop: policy forward → reference forward (no grad) → DPO loss → backward → optimizer step,
over `[chosen; rejected]` batches. `python train.py --help` lists every setting.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, get_scheduler

from dpo import checkpoint, data, demo
from dpo.config import ConfigError, TrainConfig, load_config
from dpo.evaluation import evaluate, sample_generations, summary
from dpo.loss import chosen_nll_loss
from dpo.metrics import MetricsLogger, TrainMetrics, pair_stats
from dpo.models import load_policy_and_reference, prepare_reference
from dpo.runtime import make_accelerator
from dpo.step import dpo_step


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = load_config(argv)
        resume_dir = checkpoint.resolve_resume(cfg)
        output_dir = checkpoint.prepare_output_dir(cfg, resuming=resume_dir is not None)
        train(cfg, output_dir, resume_dir)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def build_data(cfg: TrainConfig, accelerator, tokenizer):
    """Tokenized train/eval pairs, their loaders, and the length-grouped sampler."""
    try:
        with accelerator.main_process_first():  # the main process fills the datasets cache
            train_rows, eval_rows = data.load_preference_splits(
                demo.resolve_dataset(cfg.dataset), num_samples=cfg.num_samples,
                eval_samples=cfg.eval_samples, seed=cfg.seed, data_format=cfg.data_format,
                num_proc=cfg.num_proc)
            tokenize = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                            use_chat_template=cfg.use_chat_template, strict=cfg.strict_data,
                            num_proc=cfg.num_proc)
            train_ds, report = data.tokenize_preferences(train_rows, tokenizer, **tokenize)
            eval_ds = (data.tokenize_preferences(eval_rows, tokenizer, **tokenize)[0]
                       if len(eval_rows) else None)
    except ValueError as e:
        raise ConfigError(f"dataset {cfg.dataset}: {e}") from None
    if accelerator.is_main_process:
        print(f"train pairs: {report}", flush=True)
    collate = data.PreferenceCollator(tokenizer.pad_token_id)
    sampler = data.LengthGroupedBatchSampler(
        train_ds["length"], micro_batch_size=cfg.batch_size, seed=cfg.seed,
        global_batch_size=cfg.batch_size * accelerator.num_processes
        * cfg.gradient_accumulation_steps, group_by_length=cfg.group_by_length)
    train_loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
    eval_loader = eval_ds and DataLoader(eval_ds, batch_size=cfg.eval_batch_size or cfg.batch_size,
                                         collate_fn=collate)
    return train_loader, eval_loader, eval_ds, sampler


def train(cfg: TrainConfig, output_dir: Path, resume_dir: Path | None) -> None:
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        if cfg.overwrite_output_dir and resume_dir is None:
            checkpoint.clear_output_dir(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(output_dir / "training_config.yaml")
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # builds the offline demo model once
        model_path = demo.resolve_model(cfg.model)
    tokenizer = data.prepare_tokenizer(
        AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code))
    train_loader, eval_loader, eval_ds, sampler = build_data(cfg, accelerator, tokenizer)
    policy, reference = load_policy_and_reference(cfg, model_path)

    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    policy, optimizer, train_loader = accelerator.prepare(policy, optimizer, train_loader)
    eval_loader = eval_loader and accelerator.prepare(eval_loader)
    reference = prepare_reference(accelerator, reference)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    # Not passed to prepare(): stepped once per optimizer step, it counts optimizer steps.
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                              num_warmup_steps=round(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)

    step, epoch, skip = 0, 0, 0
    if resume_dir is not None:
        state = checkpoint.load_checkpoint(accelerator, resume_dir)
        step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
    accelerator.init_trackers("dpo", config={k: str(v) for k, v in vars(cfg).items()})
    logger = MetricsLogger(accelerator, output_dir, total_steps, initial_step=step)
    logger.truncate_after(step)
    metrics = TrainMetrics(accelerator.device)
    before = (run_eval(accelerator, cfg, logger, policy, reference, tokenizer, eval_loader,
                       eval_ds, step) if cfg.eval_on_start and resume_dir is None else {})
    policy.train()
    timer = time.perf_counter()

    while step < total_steps:
        sampler.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch_index, batch in enumerate(batches, start=skip + 1):
            with accelerator.accumulate(policy):
                policy_out, losses, chosen_r, rejected_r = dpo_step(
                    accelerator, cfg, policy, reference, batch)
                loss = losses.mean()
                if cfg.rpo_alpha:
                    loss = loss + cfg.rpo_alpha * chosen_nll_loss(policy_out.chosen_logps,
                                                                  policy_out.chosen_lengths)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    metrics.add_grad_norm(
                        accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            metrics.add_batch(pair_stats(losses, chosen_r, rejected_r, policy_out),
                              batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            # One optimizer step is done: count, log, evaluate and save here, and only here.
            step += 1
            logger.progress.update(1)
            end_of_epoch = batch_index == len(train_loader)
            if step % cfg.logging_steps == 0 or step == total_steps:
                timer = log_train(accelerator, logger, metrics, scheduler, step, timer,
                                  epoch + batch_index / len(train_loader))
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
                run_eval(accelerator, cfg, logger, policy, reference, tokenizer, eval_loader,
                         eval_ds, step)
            if cfg.save_steps and step % cfg.save_steps == 0:
                position = {"epoch": epoch + end_of_epoch,
                            "batches_in_epoch": 0 if end_of_epoch else batch_index}
                checkpoint.save_checkpoint(accelerator, output_dir, step,
                                           {"step": step, **position}, cfg.save_total_limit)
            if step >= total_steps:
                break
        epoch, skip = epoch + 1, 0

    final = run_eval(accelerator, cfg, logger, policy, reference, tokenizer, eval_loader,
                     eval_ds, step)
    checkpoint.save_final(accelerator, policy, tokenizer, output_dir)
    if accelerator.is_main_process:
        (output_dir / "eval_results.json").write_text(json.dumps(final, indent=2))
        print(summary(before, final), flush=True)
    logger.progress.close()
    accelerator.end_training()


def log_train(accelerator, logger, metrics, scheduler, step, timer, epoch) -> float:
    """Reduce the metrics since the last log across processes and write them; restart the timer."""
    now = time.perf_counter()
    values = metrics.compute(accelerator, now - timer)
    logger.log(step, {**values, "lr": scheduler.get_last_lr()[0], "epoch": round(epoch, 4)})
    return time.perf_counter()


def run_eval(accelerator, cfg, logger, policy, reference, tokenizer, eval_loader, eval_ds,
             step) -> dict:
    """Eval metrics on the held-out pairs plus a few sample generations; {} without eval data."""
    if eval_loader is None:
        return {}
    results = evaluate(accelerator, cfg, policy, reference, eval_loader)
    samples = sample_generations(accelerator, cfg, policy, reference, tokenizer, eval_ds)
    logger.log(step, results)
    if accelerator.is_main_process:
        with (Path(cfg.output_dir) / "samples.jsonl").open("a") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}) + "\n")
                logger.progress.write(f"[sample @ step {step}] {sample}")
    return results


if __name__ == "__main__":
    main()
