"""Evaluation on the held-out pairs, and sample generations of policy vs reference."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dpo.config import TrainConfig
from dpo.data import IGNORE_INDEX
from dpo.metrics import PAIR_KEYS, pair_stats
from dpo.step import dpo_step


@torch.no_grad()
def evaluate(accelerator: Accelerator, cfg: TrainConfig, policy, reference, loader) -> dict:
    """Mean per-pair metrics over the whole eval set, named `eval/<key>`.

    `gather_for_metrics` drops the pairs that the last batch repeats to even out the processes,
    so every pair counts exactly once however many processes run.
    """
    policy.eval()
    rows = []
    for batch in loader:
        policy_out, losses, chosen_r, rejected_r = dpo_step(accelerator, cfg, policy, reference,
                                                            batch)
        rows.append(accelerator.gather_for_metrics(
            pair_stats(losses, chosen_r, rejected_r, policy_out)))
    policy.train()
    means = torch.cat(rows).mean(0).tolist()
    return {f"eval/{key}": value for key, value in zip(PAIR_KEYS, means)}


@torch.no_grad()
def sample_generations(accelerator: Accelerator, cfg: TrainConfig, policy, reference,
                       tokenizer, eval_rows) -> list[dict]:
    """Greedy answers of the policy and the reference to the first eval prompts.

    Every process generates (under ZeRO-3 each forward needs all shards: `synced_gpus`); the
    caller logs on the main process only.
    """
    synced = (accelerator.distributed_type == DistributedType.DEEPSPEED
              and accelerator.state.deepspeed_plugin.zero_stage == 3)
    samples = []
    for row in eval_rows.select(range(min(cfg.num_sample_generations, len(eval_rows)))):
        # The prompt is what precedes the first response label (labels are −100 on the prompt).
        prompt_len = next(i for i, t in enumerate(row["chosen_labels"]) if t != IGNORE_INDEX)
        prompt = torch.tensor([row["chosen_input_ids"][:prompt_len]], device=accelerator.device)
        sample = {"prompt": tokenizer.decode(prompt[0])}
        for name, model in (("policy", policy), ("reference", reference)):
            if model is None:
                continue
            model = accelerator.unwrap_model(model)
            with accelerator.autocast():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, synced_gpus=synced,
                                     use_cache=True)
            sample[name] = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
        samples.append(sample)
    return samples


def run_eval(accelerator: Accelerator, cfg: TrainConfig, logger, policy, reference, tokenizer,
             eval_loader, eval_ds, step: int) -> dict:
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


def summary(before: dict, after: dict) -> str:
    """Held-out loss, accuracy and margin before the first step (if measured) and at the end."""
    if not after:
        return "done (no eval data)"
    lines = ["held-out pairs      " + ("before    " if before else "") + "after"]
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        was = f"{before[key]:<10.4f}" if before else ""
        lines.append(f"{key[5:]:<20}{was}{after[key]:.4f}")
    return "\n".join(lines)
