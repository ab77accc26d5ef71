"""Evaluation on the held-out pairs, and sample generations of policy vs reference."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dpo.config import TrainConfig
from dpo.data import IGNORE_INDEX
from dpo.loaders import dataset_names
from dpo.metrics import pair_keys, pair_stats
from dpo.step import Objective, chosen_token_counts, dpo_step


@torch.no_grad()
def evaluate(accelerator: Accelerator, cfg: TrainConfig, policy, reference, loader,
             names: list[str] | None = None, bco_delta: float = 0.0) -> dict:
    """Mean per-pair metrics over the whole eval set, named `eval/<key>`; with the `names` of a
    mixture's datasets, also over each dataset's pairs (the batches' `source`), named
    `eval/<name>/<key>`. `bco_delta` is BCO's baseline as training left it (`Objective`).

    `gather_for_metrics` drops the pairs that the last batch repeats to even out the processes,
    so every pair counts exactly once however many processes run.
    """
    policy.eval()
    # sft is a token mean: over the whole eval set, whatever its batches (see `sft`'s docstring).
    tokens_per_pair = (chosen_token_counts(loader.dataset).mean() if "sft" in cfg.loss_type
                       else None)
    rows, sources = [], []
    for batch in loader:
        pairs = len(batch.get("packed_sequences", batch["input_ids"])) // 2  # packed: [R, L]
        out = dpo_step(accelerator, cfg, policy, reference, batch, bco_delta=bco_delta,
                       num_tokens=tokens_per_pair and pairs * float(tokens_per_pair))
        rows.append(accelerator.gather_for_metrics(pair_stats(out)))
        if names:
            sources.append(accelerator.gather_for_metrics(batch["source"]))
    policy.train()
    stats = torch.cat(rows)  # (pairs, len(pair_keys(cfg)))
    keys = pair_keys(cfg)
    results = _means("eval", stats, keys)
    if names:
        source = torch.cat(sources)
        for i, name in enumerate(names):
            if (source == i).any():  # a dataset may have no eval share (eval_samples < datasets)
                results.update(_means(f"eval/{name}", stats[source == i], keys))
    return results


def _means(prefix: str, stats: torch.Tensor, keys: tuple[str, ...]) -> dict:
    return {f"{prefix}/{key}": value for key, value in zip(keys, stats.mean(0).tolist())}


def sample_prompts(cfg: TrainConfig, eval_rows) -> list[list[int]]:
    """Token ids of the first `num_sample_generations` eval prompts (none without eval rows)."""
    if eval_rows is None:
        return []
    rows = eval_rows.select(range(min(cfg.num_sample_generations, len(eval_rows))))
    # The prompt is what precedes the first response label (labels are −100 on the prompt).
    return [row["chosen_input_ids"][:next(i for i, t in enumerate(row["chosen_labels"])
                                          if t != IGNORE_INDEX)] for row in rows]


@torch.no_grad()
def generate_answers(accelerator: Accelerator, cfg: TrainConfig, model, tokenizer,
                     prompts: list[list[int]]) -> list[str]:
    """Greedy answers of `model` to `prompts`, decoded.

    Every process generates. Under ZeRO-3 and FSDP each forward gathers shards from every
    process, so all of them must make the same number of forwards: `synced_gpus` keeps a process
    whose answers ended early stepping until the last one is done. The model generates in eval
    mode: in train mode, with gradient checkpointing on, transformers turns the KV cache off and
    every new token would recompute the whole sequence.
    """
    synced = (accelerator.distributed_type == DistributedType.FSDP
              or (accelerator.distributed_type == DistributedType.DEEPSPEED
                  and accelerator.state.deepspeed_plugin.zero_stage == 3))
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    answers = []
    for ids in prompts:
        prompt = torch.tensor([ids], device=accelerator.device)
        with accelerator.autocast():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=synced,
                                 use_cache=True)
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    model.train(was_training)
    return answers


class Evaluator:
    """Held-out metrics and the policy's sample answers beside the reference's, at a step.

    The reference is frozen and decodes greedily, so its answers are the same at every eval: the
    caller generates them once (`generate_answers`) and passes them in; the reference model itself
    may be gone by then (`--precompute-ref-logps`).
    """

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, logger, tokenizer, loader,
                 prompts: list[list[int]], reference_answers: list[str] | None,
                 objective: Objective | None = None):
        self.accelerator, self.cfg, self.logger = accelerator, cfg, logger
        self.tokenizer, self.loader, self.prompts = tokenizer, loader, prompts
        self.reference_answers, self.objective = reference_answers, objective
        self.names = dataset_names(cfg) if len(cfg.dataset) > 1 else None

    def run(self, policy, reference, step: int) -> dict:
        """Eval metrics (logged) and sample answers (to samples.jsonl); {} without eval data."""
        if self.loader is None:
            return {}
        results = evaluate(self.accelerator, self.cfg, policy, reference, self.loader,
                           self.names, self.objective.bco_delta if self.objective else 0.0)
        answers = generate_answers(self.accelerator, self.cfg, policy, self.tokenizer,
                                   self.prompts)
        self.logger.log(step, results)
        if self.accelerator.is_main_process:
            with (Path(self.cfg.output_dir) / "samples.jsonl").open("a") as f:
                for i, (ids, answer) in enumerate(zip(self.prompts, answers)):
                    sample = {"prompt": self.tokenizer.decode(ids), "policy": answer}
                    if self.reference_answers is not None:  # None for a reference-free loss
                        sample["reference"] = self.reference_answers[i]
                    f.write(json.dumps({"step": step, **sample}) + "\n")
                    self.logger.progress.write(f"[sample @ step {step}] {sample}")
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
