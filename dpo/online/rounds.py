"""The online loop: in each round the policy samples K answers per prompt, the judge scores them,
each prompt's best and worst answers make a pair, and train.py's loop trains on those pairs.

Everything a round makes is a file, written whole (a temporary file renamed) by the main
process, so a run killed in any phase resumes at that phase (`--resume-from-checkpoint latest`):

    round-0/heldout.jsonl, metrics.json    the start model's held-out answers, scored
    round-R/samples.jsonl                  each prompt's answers, scores and pair (phase 1 done)
            pairs.jsonl                    the pairs, a dataset train.py takes as it is
            train/                         train.py's run: checkpoints, metrics, the model
            heldout.jsonl, metrics.json    the trained policy's held-out answers; the round done

Sampling is seeded per round (and per batch, `dpo.eval.generation.sample_answers`), so an
interrupted phase restarts with the same answers; training resumes from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import random
import shutil
from pathlib import Path

import yaml
from accelerate import PartialState
from accelerate.utils import set_seed
from accelerate.utils.memory import clear_device_cache
from transformers import AutoConfig

from dpo import demo
from dpo.config import ConfigError, TrainConfig, default_of
from dpo.config.model import adapter_base, is_adapter_dir
from dpo.eval.evaluation import generate_answers, judge_answers
from dpo.eval.generation import sample_answers
from dpo.eval.judges import load_judge, win_rate
from dpo.model.loading import load_causal_lm, load_tokenizer
from dpo.model.processors import is_vision_config
from dpo.online import pairs as pairing
from dpo.online.prompts import load_prompts
from dpo.train import checkpoint
from dpo.train.runtime import make_accelerator

SAMPLES, PAIRS, HELDOUT, DONE, TRAIN = ("samples.jsonl", "pairs.jsonl", "heldout.jsonl",
                                        "metrics.json", "train")
CONFIG = "training_config.yaml"
ONLINE_FIELDS = ("rounds", "samples_per_prompt", "prompts_per_round", "sample_temperature",
                 "sample_top_p", "sample_max_new_tokens", "reference_update",
                 "acceptance_threshold")
# What a round's training takes from the round, whatever the run's settings say.
DATA_FIELDS = ("data_format", "dataset_config", "data_dir", "split", "eval_dataset",
               "eval_dataset_config", "eval_data_dir", "eval_split", "streaming")


def run_online(cfg: TrainConfig, output_dir: Path, train) -> None:
    """Run `cfg.rounds` rounds of online DPO into `output_dir`; `train(cfg, output_dir)` is
    train.py's loop, run once per round on that round's pairs."""
    accelerator = make_accelerator(cfg)
    resuming = cfg.resume_from_checkpoint == "latest" and (output_dir / CONFIG).is_file()
    if accelerator.is_main_process:
        if cfg.overwrite_output_dir and not resuming:
            checkpoint.clear_output_dir(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if resuming:
            _warn_changes(output_dir / CONFIG, cfg)
        cfg.to_yaml(output_dir / CONFIG)
    accelerator.wait_for_everyone()
    if not checkpoint.detect_shared_output_dir(accelerator, output_dir):
        raise ConfigError(f"output_dir: {output_dir} is not shared by all nodes; online DPO's "
                          "processes read back the files the main process writes (answers, "
                          "pairs, each round's model): use a filesystem all nodes share")
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # builds the offline demo model once
        start = demo.resolve_model(cfg.model)
    tokenizer = load_tokenizer(cfg, start)
    if is_vision_config(AutoConfig.from_pretrained(start,
                                                   trust_remote_code=cfg.trust_remote_code)):
        raise ConfigError(f"model {cfg.model}: online DPO (--rounds) trains text-only models")
    train_prompts, heldout, report = load_prompts(cfg, tokenizer)
    accelerator.print(f"online: {len(train_prompts)} train prompts, {len(heldout)} held-out; "
                      f"{report}")
    loop = Rounds(accelerator, cfg, output_dir, start, tokenizer, train_prompts, heldout)
    accelerator.init_trackers("dpo-online", config={k: str(v) for k, v in vars(cfg).items()})
    rows = [loop.start()]
    for r in range(1, cfg.rounds + 1):
        rows.append(loop.round(r, train))
        loop.publish(rows)
    loop.finish(rows)
    accelerator.end_training()


class Rounds:
    """The rounds of one run: its prompts, judge and files; each phase skipped when its file is
    there already."""

    def __init__(self, accelerator, cfg: TrainConfig, output_dir: Path, start: str, tokenizer,
                 train_prompts, heldout):
        self.accelerator, self.cfg, self.out, self.start_path = accelerator, cfg, output_dir, start
        self.tokenizer, self.train_prompts, self.heldout = tokenizer, train_prompts, heldout
        self.judge = load_judge(cfg, accelerator.device)
        self.start_scores: list[float] | None = None

    def start(self) -> dict:
        """Round 0: the start model's held-out answers, what every round's win rate is against."""
        return self.heldout_phase(0, self.start_path)

    def round(self, r: int, train) -> dict:
        folder = self.out / f"round-{r}"
        if (folder / DONE).is_file():
            return json.loads((folder / DONE).read_text())
        policy = self.start_path if r == 1 else str(self.out / f"round-{r - 1}" / TRAIN)
        records = self.sample_phase(r, policy, folder)
        metrics = pairing.round_metrics(records, self.cfg.accepts)
        self.accelerator.print(f"round {r}: {pairing.summary(metrics)}")
        if not metrics["pairs/kept"]:
            raise ConfigError(f"round {r}: no usable pair: the judge scored all "
                              f"{self.cfg.samples_per_prompt} answers alike for each of the "
                              f"{len(records)} prompts (see {folder / SAMPLES}); sample more "
                              "answers (--samples-per-prompt), raise --sample-temperature, or "
                              "use a judge that tells them apart")
        train_dir = folder / TRAIN
        if not (train_dir / "eval_results.json").is_file():  # written last by train.py
            with _process_group_kept():
                train(self.round_config(r, policy, folder), train_dir)
            gc.collect()  # the round's models, optimizer and engine: before the next loads
            clear_device_cache(garbage_collection=True)
        return {**self.heldout_phase(r, str(train_dir)), **metrics}

    def prompts_of(self, r: int) -> list:
        """Round `r`'s prompts: all, or the next `prompts_per_round` in a seeded order."""
        n, per = len(self.train_prompts), self.cfg.prompts_per_round
        if per is None or per >= n:  # never a prompt twice in a round
            return self.train_prompts
        order = list(range(n))
        random.Random(self.cfg.seed).shuffle(order)
        return [self.train_prompts[order[((r - 1) * per + i) % n]] for i in range(per)]

    def sample_phase(self, r: int, policy: str, folder: Path) -> list[dict]:
        """Phase 1: the round's answers, scores and pairs (`samples.jsonl`, `pairs.jsonl`)."""
        if (folder / SAMPLES).is_file():
            return _read_jsonl(folder / SAMPLES)
        cfg, prompts = self.cfg, self.prompts_of(r)
        model = self.load(policy)
        samples = sample_answers(
            self.accelerator, model, self.tokenizer, [p.ids for p in prompts],
            k=cfg.samples_per_prompt, temperature=cfg.sample_temperature, top_p=cfg.sample_top_p,
            max_new_tokens=cfg.sample_max_new_tokens or cfg.max_new_tokens,
            batch_size=cfg.generation_batch_size, seed=cfg.seed + 1_000_003 * r)
        del model
        k = cfg.samples_per_prompt
        flat = judge_answers(self.accelerator, self.judge,
                             [p.messages for p in prompts for _ in range(k)],
                             [s.text for group in samples for s in group],
                             what=f"round {r} samples")
        records = [pairing.group_record(p, group, flat[i * k:(i + 1) * k])
                   for i, (p, group) in enumerate(zip(prompts, samples))]
        if self.accelerator.is_main_process:
            _write_jsonl(folder / PAIRS, pairing.pair_rows(records))
            _write_jsonl(folder / SAMPLES, records)  # last: the phase is done
        self.accelerator.wait_for_everyone()
        return records

    def round_config(self, r: int, policy: str, folder: Path) -> TrainConfig:
        """train.py's settings for round `r`: the run's, on the round's pairs (all of them, no
        eval split: the held-out prompts measure the round), from the round's policy."""
        cfg, train_dir = self.cfg, folder / TRAIN
        # None: the reference is the round's policy at its start (train.py's default).
        if r == 1 or cfg.reference_update == "per-round":
            reference = cfg.ref_model if r == 1 else None
        else:  # fixed, from round 2 on: the start, no longer the round's policy
            reference = cfg.ref_model or self.start_path
        resume = bool(checkpoint.checkpoints(train_dir))  # else a killed start: begin afresh
        return dataclasses.replace(
            cfg, **{name: default_of(name) for name in ONLINE_FIELDS + DATA_FIELDS},
            model=policy, dataset=[str(folder / PAIRS)], num_samples=None, eval_samples=0,
            ref_model=reference, judge=None, eval_on_start=False, output_dir=str(train_dir), seed=cfg.seed + r,
            resume_from_checkpoint="latest" if resume else None, overwrite_output_dir=not resume)

    def heldout_phase(self, r: int, policy: str) -> dict:
        """The policy's greedy (or `generation_temperature`) answers to the held-out prompts,
        judged: acceptance, mean score and length, win rate against the start's answers; no
        such metric without held-out prompts (`--eval-samples 0`)."""
        folder = self.out / f"round-{r}"
        if not self.heldout:
            return {"round": r}
        if not (folder / HELDOUT).is_file():
            model = self.load(policy)
            answers = generate_answers(self.accelerator, self.cfg, model, self.tokenizer,
                                       [p.ids for p in self.heldout])
            del model
            scores = judge_answers(self.accelerator, self.judge,
                                   [p.messages for p in self.heldout], answers,
                                   what=f"round {r} held-out answers")
            if self.accelerator.is_main_process:
                _write_jsonl(folder / HELDOUT, [
                    {"prompt": p.messages, "answer": a, "score": s,
                     "num_tokens": self.length(a)}
                    for p, a, s in zip(self.heldout, answers, scores)])
            self.accelerator.wait_for_everyone()
        rows = _read_jsonl(folder / HELDOUT)
        scores = [row["score"] for row in rows]
        if r == 0:
            self.start_scores = scores
        metrics = {"round": r, "heldout/score": sum(scores) / len(scores),
                   "heldout/win_rate": win_rate(scores, self.start_scores),
                   "heldout/length": sum(row["num_tokens"] for row in rows) / len(rows)}
        if self.cfg.accepts(scores[0]) is not None:
            metrics["heldout/acceptance"] = sum(map(self.cfg.accepts, scores)) / len(scores)
        return metrics

    def length(self, answer: str) -> int:
        return len(self.tokenizer(answer, add_special_tokens=False)["input_ids"])

    def load(self, path: str):
        """A round's policy for generation, whole in every process (also under ZeRO-3, which
        would partition a model loaded for no engine to gather): a model, or an adapter merged
        into its base."""
        from dpo.model import lora

        with lora.whole_weights():
            model = (lora.merge_into_base(load_causal_lm(self.cfg, adapter_base(path)), path)
                     if is_adapter_dir(path) else load_causal_lm(self.cfg, path))
        return model.to(self.accelerator.device)

    def publish(self, rows: list[dict]) -> None:
        """The finished round: its `metrics.json` (which marks it done), `metrics.jsonl` of every
        round so far, and the trackers."""
        new = rows if len(rows) == 2 else rows[-1:]  # round 0 is published with round 1
        if self.accelerator.is_main_process:
            for row in new:
                _write_json(self.out / f"round-{row['round']}" / DONE, row)
            _write_jsonl(self.out / "metrics.jsonl", rows)
        for row in new:
            self.accelerator.log(row, step=row["round"])
        self.accelerator.wait_for_everyone()

    def finish(self, rows: list[dict]) -> None:
        """The last round's model into the output directory, and the table of rounds."""
        last = self.out / f"round-{self.cfg.rounds}" / TRAIN
        if self.accelerator.is_main_process:
            for item in last.iterdir():
                if item.is_file() and item.name not in FINAL_SKIPS:
                    shutil.copy2(item, self.out / item.name)
            _write_json(self.out / "online_results.json", rows)
            rounds = pairing.table(rows)
            with (self.out / "README.md").open("a", encoding="utf-8") as card:
                card.write(f"\n## Online DPO\n\nThe policy after {self.cfg.rounds} rounds of "
                           f"online DPO from `{self.cfg.model}` on the prompts of "
                           f"`{self.cfg.dataset[0]}`, its answers judged by `{self.cfg.judge}` "
                           f"({self.cfg.samples_per_prompt} per prompt, the best against the "
                           f"worst; reference {self.cfg.reference_update}); the card above is "
                           f"round {self.cfg.rounds}'s training:\n\n```\n{rounds}\n```\n")
            print(rounds, flush=True)


# A round's run files that stay in its folder; its model and tokenizer files become the run's.
FINAL_SKIPS = ("metrics.jsonl", "eval_results.json", "training_config.yaml", "samples.jsonl")


@contextlib.contextmanager
def _process_group_kept():
    """train.py's loop ends with `Accelerator.end_training`, which also destroys the process
    group; a round runs that loop in processes that go on to the next round, so the group is
    kept until `run_online` ends its own run."""
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    try:
        yield
    finally:
        PartialState.destroy_process_group = destroy


def _warn_changes(saved: Path, cfg: TrainConfig) -> None:
    before = yaml.safe_load(saved.read_text())
    changed = [k for k, v in dataclasses.asdict(cfg).items()
               if k not in (*checkpoint.RESUME_ONLY, "rounds") and before.get(k) != v]
    if changed:
        print(f"warning: resuming with changed settings: {', '.join(changed)}", flush=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_json(path: Path, value) -> None:
    _write_text(path, json.dumps(value, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Whole or not at all: a kill mid-write leaves the temporary file, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
