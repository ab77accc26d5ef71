"""Evaluation on the held-out pairs, and sample generations of policy vs reference."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from dpo.config import TrainConfig
from dpo.data import IGNORE_INDEX
from dpo.data.batching import num_pairs
# generate_answers and share are imported from here too (train.py, dpo/evaluate.py)
from dpo.eval.generation import generate_answers, share
from dpo.eval.judges import checked_scores, load_judge, win_rate
from dpo.eval.vision_inputs import collapsed, image_label
from dpo.train.loaders import dataset_names
from dpo.train.metrics import class_means, pair_keys, pair_stats
from dpo.train.step import Objective, chosen_token_counts, dpo_step, token_mean

SHOWN_SAMPLES = 2  # sample answers printed at each eval; samples.jsonl has them all


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
    # sft (orpo's NLL) is a token mean: over the whole eval set, whatever its batches (see `sft`).
    tokens_per_pair = chosen_token_counts(loader.dataset).mean() if token_mean(cfg) else None
    rows, sources = [], []
    for batch in loader:
        pairs = num_pairs(batch)
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
    return class_means({f"{prefix}/{key}": value
                        for key, value in zip(keys, stats.mean(0).tolist())})


def sample_prompts(cfg: TrainConfig, eval_rows) -> list[list[int]]:
    """Token ids of the first `num_sample_generations` eval prompts (none without eval rows)."""
    if eval_rows is None:
        return []
    rows = eval_rows.select(range(min(cfg.num_sample_generations, len(eval_rows))))
    # The prompt is what precedes the first response label (labels are −100 on the prompt).
    return [row["chosen_input_ids"][:next(i for i, t in enumerate(row["chosen_labels"])
                                          if t != IGNORE_INDEX)] for row in rows]


def sample_images(cfg: TrainConfig, eval_rows) -> list[list[dict]] | None:
    """The images of the `sample_prompts` (one list per prompt, `{"bytes", "path"}` each, in
    prompt order), for `generate_answers`; None for text rows (no `images` column)."""
    if eval_rows is None or "images" not in eval_rows.column_names:
        return None
    return eval_rows.select(range(min(cfg.num_sample_generations, len(eval_rows))))["images"]


class Evaluator:
    """Held-out metrics and the policy's sample answers beside the reference's, at a step; with a
    judge (`--judge`), both scored: `eval/reward/{policy,reference}`, `eval/win_rate` and
    `eval/length/{policy,reference}` (mean answer length in tokens).

    The reference is frozen, so its answers are the same at every eval (with sampling, one draw):
    the caller generates them once (`generate_answers`) and passes them in; the reference model
    itself may be gone by then (`--precompute-ref-logps`). They are judged once, at the first eval.
    A `best` tracker (`dpo.train.best.BestCheckpoint`) is shown every eval's results. A vision
    run's prompts come with their `images` (`sample_images`) and the model's `processor`; each
    sample then names its prompt's images (`image_label`).
    """

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, logger, tokenizer, loader,
                 prompts: list[list[int]], reference_answers: list[str] | None,
                 objective: Objective | None = None, best=None,
                 images: list[list[dict]] | None = None, processor=None):
        self.accelerator, self.cfg, self.logger = accelerator, cfg, logger
        self.tokenizer, self.loader, self.prompts = tokenizer, loader, prompts
        self.images, self.processor = images, processor
        self.reference_answers, self.objective, self.best = reference_answers, objective, best
        self.done: tuple[int, dict] | None = None  # the latest eval: (step, results)
        self.names = dataset_names(cfg) if len(cfg.dataset) > 1 else None
        self.judge = load_judge(cfg, accelerator.device) if prompts else None
        self.reference_scores = None
        self.answers: dict[int, list[str]] = {}  # the policy's, at each eval of this process

    def run(self, policy, reference, step: int) -> dict:
        """Eval metrics (logged) and sample answers (to samples.jsonl); {} without eval data.
        Once per step: the weights of a step evaluated already have their results."""
        if self.loader is None:
            return {}
        if self.done is not None and self.done[0] == step:
            return self.done[1]
        results = evaluate(self.accelerator, self.cfg, policy, reference, self.loader,
                           self.names, self.objective.bco_delta if self.objective else 0.0)
        answers = generate_answers(self.accelerator, self.cfg, policy, self.tokenizer,
                                   self.prompts, self.images, self.processor)
        scores = self.judged(answers, results, step)
        self.answers[step], self.done = answers, (step, results)
        self.logger.log(step, results)
        if self.best is not None:
            self.best.observe(step, results)
        if self.accelerator.is_main_process:
            image_token = (None if self.images is None
                           else self.accelerator.unwrap_model(policy).config.image_token_id)
            samples = []
            for i, (ids, answer) in enumerate(zip(self.prompts, answers)):
                sample = {"prompt": self.tokenizer.decode(ids if image_token is None
                                                          else collapsed(ids, image_token))}
                if self.images is not None:  # which pictures the answers are about
                    sample["images"] = [image_label(record) for record in self.images[i]]
                sample["policy"] = answer
                if self.reference_answers is not None:  # None for a reference-free loss
                    sample["reference"] = self.reference_answers[i]
                if scores is not None:
                    sample["reward_policy"] = scores[i]
                    if self.reference_scores is not None:
                        sample["reward_reference"] = self.reference_scores[i]
                samples.append(sample)
            with (Path(self.cfg.output_dir) / "samples.jsonl").open("a") as f:
                f.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)
            for sample in samples[:SHOWN_SAMPLES]:  # the rest are in samples.jsonl
                self.logger.progress.write(f"[sample @ step {step}] {sample}")
            log_samples(self.accelerator, step, samples)
        return results

    def summary(self, before: dict, after: dict) -> str:
        """`summary`, then the reference's answer (before) and the policy's (after: at the step
        of the saved weights, `after["step"]` where given, else the last eval) to the first two
        sample prompts."""
        lines = [summary(before, after)]
        answers = self.answers.get(after.get("step", self.done and self.done[0]), [])
        if self.reference_answers is not None:
            for i, answer in enumerate(answers[:SHOWN_SAMPLES]):
                lines += [f"prompt: {self.prompt_text(i)!r}",
                          f"  before (reference): {self.reference_answers[i]!r}",
                          f"  after (policy):     {answer!r}"]
        return "\n".join(lines)

    def prompt_text(self, i: int) -> str:
        """The user's last turn of sample prompt `i`, else the prompt's text as the model saw it."""
        messages = self.loader.dataset[i]["prompt_messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        return users[-1] if users else self.tokenizer.decode(self.prompts[i])

    def judged(self, answers: list[str], results: dict, step: int) -> list[float] | None:
        """The policy's scores (None without a judge); adds the judge's metrics to `results`."""
        if self.judge is None:
            return None
        messages = self.loader.dataset.select(range(len(self.prompts)))["prompt_messages"]
        scores = judge_answers(self.accelerator, self.judge, messages, answers,
                               f"the policy's sample answers at step {step}")
        results["eval/reward/policy"] = sum(scores) / len(scores)
        results["eval/length/policy"] = self.mean_length(answers)
        if self.reference_answers is not None:
            if self.reference_scores is None:
                self.reference_scores = judge_answers(self.accelerator, self.judge, messages,
                                                      self.reference_answers,
                                                      "the reference's sample answers")
            results["eval/reward/reference"] = (sum(self.reference_scores)
                                                / len(self.reference_scores))
            results["eval/win_rate"] = win_rate(scores, self.reference_scores)
            results["eval/length/reference"] = self.mean_length(self.reference_answers)
        return scores

    def mean_length(self, answers: list[str]) -> float:
        return sum(len(self.tokenizer(a, add_special_tokens=False)["input_ids"])
                   for a in answers) / len(answers)


def log_samples(accelerator: Accelerator, step: int, samples: list[dict]) -> None:
    """The sample answers (and scores) as a table, to the trackers that take one: a tracker's
    `log_table` (wandb), or a TensorBoard writer's text (a markdown table). Main process."""
    if not samples:
        return
    columns = list(samples[0])
    rows = [[sample[c] for c in columns] for sample in samples]
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_table"):
            tracker.log_table("eval/samples", columns=columns, data=rows, step=step)
        elif hasattr(getattr(tracker, "writer", None), "add_text"):
            cells = [" | ".join(json.dumps(v, ensure_ascii=False) for v in row) for row in rows]
            table = "\n".join([" | ".join(columns), " | ".join("---" for _ in columns), *cells])
            tracker.writer.add_text("eval/samples", table, global_step=step)


def judge_answers(accelerator: Accelerator, judge, messages: list[list[dict]],
                  answers: list[str], what: str) -> list[float]:
    """`judge`'s scores of `answers` (`what` they are, for errors: `checked_scores`), in order,
    on every process: each process scores its share (the judge is a whole model in each
    process: no forward needs the others)."""
    mine, _ = share(accelerator, len(answers))
    scores = checked_scores(judge, [messages[i] for i in mine], [answers[i] for i in mine],
                            what=what, first=mine[0] if mine else 0)
    return gather_object(scores) if accelerator.num_processes > 1 else scores


def summary(before: dict, after: dict) -> str:
    """Held-out loss, accuracy and margin before the first step (if measured) and at the end;
    with a judge, the sample answers' win rate against the reference and their mean scores."""
    if not after:
        return "done (no eval data)"
    unpaired = "eval/kl" in after  # KTO: labelled completions, no pair to be right about
    lines = [f"held-out {'rows' if unpaired else 'pairs':<11}" + ("before    " if before else "")
             + "after"]
    for key in ("eval/loss", "eval/kl" if unpaired else "eval/rewards/accuracies",
                "eval/rewards/margins"):
        if key not in after:  # KTO's margin needs both classes among the eval rows
            continue
        was = f"{before[key]:<10.4f}" if before else ""
        lines.append(f"{key[5:]:<20}{was}{after[key]:.4f}")
    judged = [key for key in JUDGED_KEYS if key in after]
    if judged:
        lines.append("sample answers")
    for key in judged:
        was = (f"{before[key]:<10.4f}" if key in before else " " * 10) if before else ""
        lines.append(f"{key[5:]:<20}{was}{after[key]:.4f}")
    return "\n".join(lines)


# Judge metrics in the end-of-run table (the mean answer lengths are in eval_results.json).
JUDGED_KEYS = ("eval/win_rate", "eval/reward/policy", "eval/reward/reference")
