"""Shared-prompt batches against separate sequences: what computing each prompt once gains.

Runs the real DPO step (`dpo_step`, `accelerator.backward`, clipping, AdamW inside
`accelerator.accumulate`, the live reference) on a randomly initialised model of a named shape
(default SmolLM2-135M, CPU fp32), on natural-length pairs of two datasets side by side:
HH-RLHF helpful-base (multi-turn transcripts: long prompts) and the stack-exchange rows of the
seed dataset (`../shared`), tokenized as `bench/padding_free.py` does (Llama-3.1 tokenizer, ids
folded into the shape's vocabulary). Each layout runs in its own subprocess, so each peak memory
is its own, on the same pairs in the same order:

- separate: `[chosen; rejected]` sequences packed end to end (`--no-share-prompt`);
- shared: `--share-prompt --no-padding-free`, a pair per row `[prompt | chosen | rejected]`;
- shared-packed: the pairs' segments end to end in one row (the default on CPU).

Per dataset and layout: mean s/step (every layout runs the same batches, whose lengths differ
from step to step: the mean compares them, a median would not), real tokens computed per step,
the share of the pairs' tokens a shared prompt saves, pair tokens/s (the pairs' real tokens as
separate sequences, per second: the same work counted the same way in every layout), peak RSS;
per dataset the ideal gain (the real tokens of separate sequences over those of shared ones:
what computing each prompt once removes) beside the measured gain (separate's s/step over the
layout's, the same pairs), and the measured gain's share of the ideal one.

    python bench/shared_prompt.py                      # SmolLM2-135M shape, CPU fp32
    python bench/shared_prompt.py --shape tiny --steps 1 --warmup 0 --datasets stack-exchange
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib.common import (SHAPES, model_config, peak_memory, reset_peak_memory,  # noqa: E402
                             run_child, train_micro_batch)
from padding_free import SHARED, TOKENIZER, load_pairs  # noqa: E402

DATASETS = {"hh-rlhf": SHARED / "data" / "hh_rlhf_helpful_base_test.jsonl.gz",
            "stack-exchange": SHARED / "data" / "stack_exchange_paired_tiny.json"}
LAYOUTS = {"separate": (True, False), "shared": (False, True), "shared-packed": (True, True)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="smollm2-135m")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated, of {', '.join(LAYOUTS)}")
    parser.add_argument("--tokenizer", default=str(TOKENIZER))
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("DATASET", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, known in (("datasets", DATASETS), ("layouts", LAYOUTS)):
        chosen = [v.strip() for v in getattr(args, name).split(",")]
        if unknown := set(chosen) - set(known):
            parser.error(f"--{name}: unknown {sorted(unknown)}")
        setattr(args, name, chosen)
    return args


def run(args, dataset: str, layout: str) -> dict:
    """Warm-up steps, then `args.steps` timed optimizer steps of one layout; its figures."""
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from dpo import data
    from dpo.config import TrainConfig
    from dpo.model.loading import prepare_reference
    from dpo.model.probes import settle_logps_path
    from dpo.train.loaders import make_collator
    from dpo.train.runtime import make_accelerator, make_optimizer

    padding_free, share_prompt = LAYOUTS[layout]
    cfg = TrainConfig(model=f"random:{args.shape}", seed=args.seed, batch_size=args.batch_size,
                      max_length=args.max_length, padding_free=padding_free,
                      share_prompt=share_prompt,
                      output_dir=str(ROOT / "outputs" / "bench_shared_prompt"))
    accelerator = make_accelerator(cfg)
    set_seed(args.seed)
    config = model_config(args.shape, None)
    args.data = str(DATASETS[dataset])
    pairs, pad_id = load_pairs(args, (args.steps + args.warmup) * args.batch_size,
                               config.vocab_size)
    policy = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = make_optimizer(cfg, policy)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    cfg = settle_logps_path(accelerator, cfg, policy)  # the layout probes, as train.py
    reference = prepare_reference(accelerator, reference)
    sampler = data.LengthGroupedBatchSampler(pairs["length"], micro_batch_size=args.batch_size,
                                             global_batch_size=args.batch_size, seed=args.seed)

    class PadId:  # make_collator reads the tokenizer's pad id only
        pad_token_id = pad_id

    batches = iter(accelerator.prepare(DataLoader(pairs, batch_sampler=sampler,
                                                  collate_fn=make_collator(cfg, PadId))))
    policy.train()
    times, tokens, pair_tokens, losses = [], [], [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            reset_peak_memory(accelerator.device)
        batch = next(batches)
        start = time.perf_counter()
        loss = train_micro_batch(accelerator, cfg, policy, reference, optimizer, batch)
        losses.append(loss.item())  # synchronises
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(int(batch["attention_mask"].sum()))
            pair_tokens.append(pair_token_count(batch))
    peak_rss, peak_gpu = peak_memory(accelerator.device)
    return {"dataset": dataset, "layout": layout, "shape": args.shape,
            "threads": torch.get_num_threads(), "pairs_per_step": args.batch_size,
            "max_length": args.max_length, "steps": args.steps,
            "s_per_step": round(statistics.mean(times), 3),
            "tokens_per_step": round(statistics.mean(tokens), 1),
            "tokens_saved": round(1 - sum(tokens) / sum(pair_tokens), 3),
            "pair_tokens_per_s": round(sum(pair_tokens) / sum(times), 1),
            "peak_rss_mib": round(peak_rss, 1),
            "peak_gpu_mib": None if peak_gpu is None else round(peak_gpu, 1),
            "losses": [round(x, 6) for x in losses]}


def pair_token_count(batch) -> int:
    """The real tokens of the batch's pairs as separate `[chosen; rejected]` sequences: what
    the step computes for them, a shared prompt counted twice as separate sequences have it."""
    if "shared_pairs" not in batch:
        return int(batch["attention_mask"].sum())
    _, _, prompt, chosen, rejected = batch["shared_pairs"].unbind(-1)
    return int((2 * prompt + chosen + rejected).sum())


def summarise(results: list[dict]) -> dict:
    out = {}
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = {r["layout"]: r for r in results if r["dataset"] == dataset}
        base = runs.get("separate")
        if base is None:
            continue
        for layout in ("shared", "shared-packed"):
            if layout not in runs:
                continue
            ideal = base["tokens_per_step"] / runs[layout]["tokens_per_step"]
            measured = base["s_per_step"] / runs[layout]["s_per_step"]
            out[f"{dataset}/{layout}"] = {
                "ideal_gain": round(ideal, 3), "measured_gain": round(measured, 3),
                "share_of_ideal": round((measured - 1) / (ideal - 1), 3) if ideal > 1 else None,
                "peak_rss_vs_separate": round(runs[layout]["peak_rss_mib"]
                                              / base["peak_rss_mib"], 3)}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run(args, *args.child)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    results = []
    for dataset in args.datasets:
        for layout in args.layouts:
            child = run_child(__file__, [*argv, "--child", dataset, layout])
            if child.returncode:
                sys.exit(f"{dataset} {layout} failed:\n{child.stderr[-3000:]}")
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    first = results[0]
    print(f"\nshape {first['shape']}, {first['threads']} threads, max length "
          f"{first['max_length']}, {first['pairs_per_step']} pairs/step, {first['steps']} timed "
          "steps")
    print(f"{'dataset':>15} {'layout':>14} {'s/step':>8} {'tokens/step':>12} {'saved':>6} "
          f"{'pair tokens/s':>14} {'peak RSS MiB':>13}")
    for r in results:
        print(f"{r['dataset']:>15} {r['layout']:>14} {r['s_per_step']:8.2f} "
              f"{r['tokens_per_step']:12.1f} {r['tokens_saved']:6.1%} "
              f"{r['pair_tokens_per_s']:14.1f} {r['peak_rss_mib']:13.0f}")
    print(json.dumps({"runs": results, **summarise(results)}))


if __name__ == "__main__":
    main()
