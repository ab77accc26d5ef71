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

from accelerate.utils import set_seed
from accelerate.utils.memory import clear_device_cache
from transformers import get_scheduler

from dpo import demo
from dpo.eval import model_card
from dpo.train import checkpoint
from dpo.config import ConfigError, TrainConfig, load_config
from dpo.eval.evaluation import Evaluator, generate_answers, sample_images, sample_prompts
from dpo.model.probes import settle_logps_path
from dpo.online.rounds import run_online
from dpo.train.loaders import build_dataloaders, build_datasets, make_collator
from dpo.train.metrics import MetricsLogger, TrainMetrics, log_train, pair_keys, pair_stats
from dpo.model.loading import (check_reference_layout, load_policy_and_reference,
                               load_tokenizer_and_processor, prepare_reference)
from dpo.train.best import BestCheckpoint
from dpo.train.reference_cache import precompute_for_run
from dpo.train.runtime import make_accelerator, make_optimizer
from dpo.train.safety import NonFiniteGuard, StopRequest
from dpo.train.step import Objective


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = load_config(argv)
        output_dir = checkpoint.prepare_output_dir(
            cfg, resuming=cfg.resume_from_checkpoint is not None)
        # --rounds: online DPO, whose rounds train on the policy's own judged answers
        run_online(cfg, output_dir, train) if cfg.rounds else train(cfg, output_dir)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def train(cfg: TrainConfig, output_dir: Path) -> None:
    accelerator = make_accelerator(cfg)
    check_reference_layout(accelerator, cfg)
    # Resolved once the processes can compare: each node reads its own files.
    resume_dir = checkpoint.agree_on_resume(accelerator, cfg)
    if resume_dir is not None:
        changed = checkpoint.check_resume(resume_dir, cfg, accelerator.num_processes)
        cfg = checkpoint.inherit_start_up_choices(resume_dir, cfg)
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # builds the offline demo model once
        model_path = demo.resolve_model(cfg.model)
    tokenizer, processor = load_tokenizer_and_processor(cfg, model_path)  # processor: images
    train_ds, eval_ds = build_datasets(cfg, accelerator, tokenizer, processor)
    policy, reference = load_policy_and_reference(cfg, model_path)
    # Only now, with data and models loaded, does the run touch its output directory: a bad
    # input leaves no half-made run behind (nor a non-empty directory that blocks the rerun).
    shared = checkpoint.detect_shared_output_dir(accelerator, output_dir)
    if accelerator.is_main_process or (not shared and accelerator.is_local_main_process):
        if cfg.overwrite_output_dir and resume_dir is None:
            checkpoint.clear_output_dir(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(output_dir / "training_config.yaml")

    optimizer = make_optimizer(cfg, policy)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    # After prepare, not before: ZeRO-3 loads the weights already sharded, and only the engine
    # gathers them for a forward. The reference is placed first, so that the padding-free probe
    # runs it as it will run.
    reference = prepare_reference(accelerator, reference)
    cfg = settle_logps_path(accelerator, cfg, policy, reference)
    if resume_dir is not None:  # what start-up settles is compared as settled
        changed += checkpoint.settled_changes(resume_dir, cfg)
        if changed:
            accelerator.print(f"warning: resuming with changed settings: {', '.join(changed)}")
    collate = make_collator(cfg, tokenizer, processor)  # packing or padding, now settled
    # Frozen and greedy, the reference answers the sample prompts alike at every eval: once.
    prompts, images = sample_prompts(cfg, eval_ds), sample_images(cfg, eval_ds)
    ref_answers = None if reference is None else generate_answers(  # None: reference-free loss
        accelerator, cfg, reference, tokenizer, prompts, images, processor)
    if cfg.precompute_ref_logps:  # the batches then carry the reference's log-probs
        train_ds, eval_ds = precompute_for_run(accelerator, cfg, reference, model_path,
                                               train_ds, eval_ds, collate)
        # Not among accelerate's models, the reference goes with our name (gc: its cycles).
        reference = None
        clear_device_cache(garbage_collection=True)
        accelerator.print("reference: freed; training on its precomputed log-probs")
    train_loader, eval_loader, sampler = build_dataloaders(cfg, accelerator, train_ds, eval_ds,
                                                           collate)
    train_loader = accelerator.prepare(train_loader)
    # Before resuming: it registers what checkpoints hold of it (BCO's δ, a synced reference).
    objective = Objective(accelerator, cfg, train_ds, policy, reference)
    eval_loader = eval_loader and accelerator.prepare(eval_loader)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    # Not passed to prepare(): stepped once per optimizer step, it counts optimizer steps.
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                              num_warmup_steps=round(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)

    step, epoch, skip = 0, 0, 0
    best = BestCheckpoint(cfg, has_eval=eval_loader is not None)  # --metric-for-best-model
    if resume_dir is not None:
        state = checkpoint.load_checkpoint(accelerator, resume_dir)
        step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
        best.restore(state)
    accelerator.init_trackers("dpo", config={k: str(v) for k, v in vars(cfg).items()})
    logger = MetricsLogger(accelerator, output_dir, total_steps, initial_step=step)
    logger.truncate_after(step)
    metrics = TrainMetrics(accelerator.device, pair_keys(cfg))
    guard, stop = NonFiniteGuard(accelerator, cfg.skip_nonfinite_steps), StopRequest(accelerator)
    evaluator = Evaluator(accelerator, cfg, logger, tokenizer, eval_loader, prompts, ref_answers,
                          objective, best, images, processor)
    before = evaluator.run(policy, reference, step) if cfg.eval_on_start and not resume_dir else {}
    policy.train()
    timer = time.perf_counter()

    with logger.progress:  # closed first: a stopping error's one line is the last one printed
        while step < total_steps:
            batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            # Accelerate re-seeds a sampler by its loader's own epoch count, which a resumed run's
            # fresh loaders restart at 0, and does not reach ours behind its multi-process shard.
            batches.set_epoch(epoch)
            sampler.set_epoch(epoch)
            objective.start_epoch(sampler)
            for batch_index, batch in enumerate(batches, start=skip + 1):
                with accelerator.accumulate(policy):
                    out = objective.train_step(policy, reference, batch, batch_index)
                    loss = out.losses.mean()
                    guard.add_loss(loss)
                    if accelerator.sync_gradients:  # where a NaN is reported: step, batches
                        at = dict(step=step + 1, epoch=epoch, batches=range(
                            batch_index - cfg.gradient_accumulation_steps + 1, batch_index + 1))
                        guard.check_loss(**at)  # DeepSpeed steps inside backward
                    accelerator.backward(loss)
                    update = True
                    if accelerator.sync_gradients:  # clip (inf: only measure) and check the norm
                        grad_norm = accelerator.clip_grad_norm_(policy.parameters(),
                                                                cfg.max_grad_norm or math.inf)
                        metrics.add_grad_norm(grad_norm)
                        update = guard.check(grad_norm, **at)
                    if update:
                        optimizer.step()
                    optimizer.zero_grad()
                metrics.add_batch(pair_stats(out), batch["attention_mask"])
                if not accelerator.sync_gradients:
                    continue
                # One optimizer step is done: count, log, evaluate and save here, and only here.
                step += 1
                if update and not accelerator.optimizer_step_was_skipped:  # fp16 scaler skips
                    scheduler.step()
                objective.end_step(step)
                logger.progress.update(1)
                end_of_epoch = batch_index == len(train_loader)
                if step % cfg.logging_steps == 0 or step == total_steps:
                    timer = log_train(accelerator, logger, metrics, scheduler, step, timer,
                                      epoch + batch_index / len(train_loader), guard.skipped)
                if cfg.eval_steps and step % cfg.eval_steps == 0:  # before a save at this step
                    evaluator.run(policy, reference, step)
                stopping = stop.requested()
                if stopping or (cfg.save_steps and step % cfg.save_steps == 0):
                    state = checkpoint.trainer_state(
                        cfg, accelerator.num_processes, step=step, epoch=epoch + end_of_epoch,
                        batches_in_epoch=0 if end_of_epoch else batch_index, **best.on_save(step))
                    checkpoint.save_checkpoint(accelerator, output_dir, step, state,
                                               cfg.save_total_limit, best.checkpoint_step)
                if stopping:
                    accelerator.print(f"{stop.signal_name}: saved checkpoint-{step} in "
                                      f"{time.perf_counter() - stop.received_at:.1f}s; continue "
                                      "with --resume-from-checkpoint latest")
                    accelerator.end_training()
                    return
                if step >= total_steps:
                    break
            epoch, skip = epoch + 1, 0

    # With --load-best-model-at-end the best checkpoint's weights, and their results, from here.
    final = best.finish(accelerator, output_dir, step, evaluator.run(policy, reference, step))
    checkpoint.save_final(accelerator, policy, processor or tokenizer, output_dir,
                          cfg.merge_adapter)  # a vision model's processor holds its tokenizer
    if accelerator.is_main_process:
        (output_dir / "eval_results.json").write_text(json.dumps(final, indent=2))
        model_card.write(output_dir, cfg, final, step, accelerator.num_processes, train_ds, eval_ds)
        print(evaluator.summary(before, final), flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
