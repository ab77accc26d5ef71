"""Full fine-tuning against LoRA: peak memory and seconds per optimizer step, side by side.

Each (shape, mode) runs in its own subprocess, so each peak RSS is its own: a randomly initialised
model of a published shape (`benchlib.common.SHAPES`; nothing is downloaded), synthetic pairs,
the real training step (`dpo_step`, `accelerator.backward`, clipping, AdamW, as `train.py`).

- full: the policy and a frozen copy as the reference (two models), AdamW over every weight;
- lora: the policy with a rank-r adapter on every linear layer of the body (peft "all-linear"),
  the reference the same model with its adapter off (`dpo.model.lora.AdapterOffReference`),
  AdamW over the adapter only.

Peak RSS is the whole process's high-water mark (models, optimizer state and steps), read from
/proc/self/status. s/step is the median of the timed steps after the warm-up.

RSS also counts memory glibc keeps after `free`: its mmap threshold grows as large blocks are
freed, after which activations come from a heap that fragments and is not given back, and
LoRA's layers (the base output plus the adapter's, a new tensor per layer) fragment it more. With
`MALLOC_MMAP_THRESHOLD_=131072` (fixed at glibc's default) every large tensor is mapped and
unmapped on its own, and the peak follows the live tensors instead; both are worth reading.

    python bench/lora.py                        # SmolLM2-135M and Qwen3-0.6B shapes, CPU fp32
    python bench/lora.py --shapes smollm2-135m --modes lora --steps 1
    MALLOC_MMAP_THRESHOLD_=131072 python bench/lora.py   # peak RSS of the live tensors
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (max length, pairs per micro-batch, micro-batches per step, timed steps) per shape: the
# 0.6B shape is kept small, its full fine-tuning alone needs ~15 GB.
SETTINGS = {"smollm2-135m": (256, 4, 2, 3), "qwen3-0.6b": (256, 2, 1, 2), "tiny": (64, 2, 2, 1)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2-135m,qwen3-0.6b",
                        help=f"comma-separated shapes of {', '.join(SETTINGS)} (tiny: the demo's "
                             "model, for a quick check)")
    parser.add_argument("--modes", default="full,lora", help="full, lora or both")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, help="timed steps (default: per shape)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--max-length", type=int, help="tokens per sequence (default: per shape)")
    parser.add_argument("--vocab-size", type=int, help="override the shape's vocabulary")
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args, shape: str, mode: str) -> dict:
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from benchlib.common import model_config, peak_memory, synthetic_pairs
    from dpo import data
    from dpo.config import TrainConfig
    from dpo.train.runtime import make_accelerator, make_optimizer
    from dpo.train.step import dpo_step

    length, batch_size, accumulation, steps = SETTINGS[shape]
    length, steps = args.max_length or length, args.steps or steps
    cfg = TrainConfig(model=f"random:{shape}", seed=0, batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, max_length=length,
                      lora_r=args.lora_r if mode == "lora" else 0,
                      lora_alpha=2.0 * args.lora_r, output_dir=tempfile.mkdtemp())
    accelerator = make_accelerator(cfg)
    global_batch = batch_size * accumulation
    config = model_config(shape, args.vocab_size)
    pairs = synthetic_pairs((steps + args.warmup) * global_batch, config.vocab_size, length, 0)
    set_seed(0)
    policy = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if mode == "full":
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    else:
        from peft import get_peft_model

        from dpo.model.lora import AdapterOffReference, lora_config

        peft_model = get_peft_model(policy, lora_config(cfg))
        policy, reference = peft_model.get_base_model(), AdapterOffReference(peft_model)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    optimizer = make_optimizer(cfg, policy)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    collate = data.PreferenceCollator(0)
    sampler = data.LengthGroupedBatchSampler(pairs["length"], micro_batch_size=batch_size,
                                             global_batch_size=global_batch, seed=0)
    batches = iter(accelerator.prepare(DataLoader(pairs, batch_sampler=sampler,
                                                  collate_fn=collate)))
    policy.train()
    times, loss = [], float("nan")
    for step in range(args.warmup + steps):
        start = time.perf_counter()
        for _ in range(accumulation):
            with accelerator.accumulate(policy):
                out = dpo_step(accelerator, cfg, policy, reference, next(batches))
                accelerator.backward(out.losses.mean())
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        loss = out.losses.mean().item()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak_rss, _ = peak_memory(accelerator.device)
    return {"shape": shape, "mode": mode if mode == "full" else f"lora r={args.lora_r}",
            "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 1),
            "trainable_m": round(trainable / 1e6, 2), "max_length": length,
            "pairs_per_step": global_batch, "timed_steps": steps,
            "threads": torch.get_num_threads(),
            "s_per_step": round(statistics.median(times), 2),
            "peak_rss_mib": round(peak_rss), "loss_last": round(loss, 5)}


def main(argv=None) -> None:
    from benchlib.common import run_child

    args = parse_args(argv)
    if args.child:
        print(json.dumps(run(args, *args.child)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    rows = []
    for shape in args.shapes.split(","):
        for mode in args.modes.split(","):
            child = run_child(__file__, [*argv, "--child", shape, mode])
            if child.returncode:
                sys.exit(f"{shape} {mode} failed:\n{child.stderr[-3000:]}")
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("| shape | mode | params (M) | trainable (M) | s/step | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['mode']} | {r['params_m']} | {r['trainable_m']} | "
              f"{r['s_per_step']} | {r['peak_rss_mib']} |")


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    main()
