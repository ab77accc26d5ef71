"""Speed, padding, memory and FLOP utilisation of the real DPO training step.

Runs optimizer steps exactly as `train.py` does (`dpo_step`, `accelerator.backward`, clipping and
AdamW inside `accelerator.accumulate`) on a randomly initialised model of a named shape (nothing
is downloaded) and prints a table and one JSON line:

- s/step: median seconds per optimizer step after the warm-up steps;
- tokens/s: real (non-padding) tokens of the timed steps over their time;
- padding: share of the batches' positions that are padding;
- peak RSS (CPU) / peak allocated GPU memory, during the timed steps;
- FLOP utilisation: the model FLOPs of the timed steps per second, over the dense matmul FLOP/s
  this script measures on the same device (an `n×n` `torch.mm` loop, best of several). Model
  FLOPs count only useful work: per real token 2·N for the forward (N = the weights of every
  matmul except the LM head), the LM head's 2·H·V on response tokens only (the loss reads no
  other logits), causal attention 2·d·s² per layer and sequence; the policy's backward twice its
  forward, the reference's forward once (not at all with precomputed log-probs).
  Recomputation (activation checkpointing) is not counted: this is MFU, not hardware FLOPs.
  With `--peak-tflops` (a GPU's datasheet peak) the same FLOP/s are also reported as MFU against
  that peak, the figure GPU papers quote.

Implementations (`--impl`):

- plain: the textbook step (`dpo.textbook.textbook_dpo_step`): full `[2B, T, V]` logits and a
  log-softmax over all of them, the padding mask passed to attention, no length grouping,
  torch's default AdamW;
- optimized: the defaults of `train.py` (`dpo.train.step.dpo_step`): chunked LM head on response
  tokens only, mask-free causal attention on right-padded batches, length grouping, fused
  AdamW (`dpo.train.runtime.make_optimizer`);
- precomputed: optimized, with the reference's log-probs computed in one pass before training
  (`dpo.train.reference_cache`) and the reference model freed; the pass is timed separately.

The timed steps are one epoch over the same pairs for every implementation (the warm-up steps run
first on the epoch's first batches), so plain and optimized see exactly the same pairs.
`--compare` runs each implementation in a process of its own (`benchlib.common.run_child`), so
each peak memory is its own, and prints the ratios against the plain one and the issue's targets.

    python bench/bench_train.py --compare                                   # demo data, tiny
    python bench/bench_train.py --shape smollm2-135m --synthetic --max-length 256 \\
        --batch-size 2 --grad-accum 2 --steps 3 --warmup 1 --compare
    python bench/bench_train.py --shape tiny --vocab-size 151669 --synthetic --max-length 512 \\
        --compare                                                 # memory at Qwen3's vocabulary
    python bench/bench_train.py --shape qwen3-0.6b --synthetic --max-length 1024 \\
        --mixed-precision bf16 --impl optimized                   # on a GPU: MFU against bf16
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib.common import (SHAPES, FlopCounter, compute_dtype, load_pairs, matmul_flops,
                             model_config, peak_memory, reset_peak_memory, run_child, sync)
from benchlib.train_report import IMPLS, print_ratios, print_table, ratios

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny",
                        help="model shape (random init); tiny = the offline demo model's")
    parser.add_argument("--vocab-size", type=int,
                        help="override the shape's vocabulary (e.g. 151669, Qwen3's)")
    parser.add_argument("--dataset", default="builtin:demo-preferences",
                        help="preference data as train.py takes it (default: the offline demo)")
    parser.add_argument("--tokenizer", help="tokenizer for --dataset (default: the demo's)")
    parser.add_argument("--synthetic", action="store_true",
                        help="random-token pairs instead of --dataset: prompt and each response "
                        "uniform in [max_length/16, max_length/2] tokens")
    parser.add_argument("--impl", choices=IMPLS, default="optimized")
    parser.add_argument("--compare", action="store_true",
                        help="run every --impls one after the other (subprocesses), with ratios")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help="implementations that --compare runs (comma-separated)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--chunk-size", type=int, default=256, help="LM-head chunk (tokens)")
    parser.add_argument("--precompute-batch-size", type=int, default=8,
                        help="pairs per reference forward in the precompute pass")
    parser.add_argument("--attn-implementation", default="sdpa", help="sdpa or eager")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--matmul-size", type=int, default=2048,
                        help="n of the n×n×n matmul that measures the device's FLOP/s")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's datasheet dense peak in TFLOP/s for the compute dtype "
                             "(e.g. 989 for an H100 SXM in bf16): also report MFU against it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step with torch.profiler; print its top ops")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    args.impls = [name.strip() for name in args.impls.split(",")]
    if unknown := set(args.impls) - set(IMPLS):
        parser.error(f"--impls: unknown {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    return args



# --------------------------------------------------------------------------------------------
# One implementation, in this process
# --------------------------------------------------------------------------------------------


def run(args, impl: str) -> dict:
    """Warm-up steps, then one timed epoch of `args.steps` optimizer steps; the metrics."""
    import torch
    from accelerate.utils import set_seed
    from accelerate.utils.memory import clear_device_cache
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from dpo import data
    from dpo.config import TrainConfig
    from dpo.model.loading import prepare_reference
    from dpo.train.reference_cache import precompute_reference_logps
    from dpo.train.runtime import make_accelerator, make_optimizer
    from dpo.train.step import dpo_step
    from dpo.textbook import textbook_dpo_step

    os.environ["ACCELERATE_MIXED_PRECISION"] = args.mixed_precision
    output_dir = tempfile.mkdtemp(prefix="bench_train_")
    cfg = TrainConfig(model=f"random:{args.shape}", dataset=args.dataset, seed=args.seed,
                      batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                      max_length=args.max_length, chunked_logps=impl != "plain",
                      logps_chunk_size=args.chunk_size, group_by_length=impl != "plain",
                      attn_implementation=args.attn_implementation, output_dir=output_dir)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    global_batch = args.batch_size * args.grad_accum * accelerator.num_processes
    pairs, pad_id, data_vocab = load_pairs(args, args.steps * global_batch)

    set_seed(args.seed)
    config = model_config(args.shape, args.vocab_size or (data_vocab if args.shape == "tiny"
                                                          else None))
    if data_vocab > config.vocab_size:
        sys.exit(f"error: the data has token ids up to {data_vocab}, the {args.shape} shape "
                 f"a vocabulary of {config.vocab_size}; pass --vocab-size or --synthetic")
    policy = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    flops = FlopCounter(policy)
    collate = data.PreferenceCollator(pad_id)

    # Set up in train.py's order. The textbook uses torch's default AdamW; train.py its fused one.
    optimizer = (torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate) if impl == "plain"
                 else make_optimizer(cfg, policy))
    policy, optimizer = accelerator.prepare(policy, optimizer)
    reference = prepare_reference(accelerator, reference)
    precompute_s = None
    if impl == "precomputed":
        start = time.perf_counter()
        pairs = precompute_reference_logps(
            accelerator, reference, pairs, collate, batch_size=args.precompute_batch_size,
            chunked=cfg.chunked_logps, chunk_size=cfg.logps_chunk_size, cache_dir=None,
            cache_key_parts=None)  # timed as a fresh pass: no cache
        precompute_s = time.perf_counter() - start
        reference = None  # the point: no reference model during training
        clear_device_cache(garbage_collection=True)

    sampler = data.LengthGroupedBatchSampler(
        pairs["length"], micro_batch_size=args.batch_size, global_batch_size=global_batch,
        seed=args.seed, group_by_length=cfg.group_by_length)
    loader = accelerator.prepare(DataLoader(pairs, batch_sampler=sampler, collate_fn=collate))
    policy.train()

    def optimizer_step(batches) -> tuple[int, int, float, float]:
        """One optimizer step as train.py runs it: (real tokens, positions, FLOPs, loss)."""
        tokens, positions, model_flops = 0, 0, 0.0  # tensors on the device after the first batch
        for batch in batches:
            with accelerator.accumulate(policy):
                if impl == "plain":  # under the autocast that dpo_step sets itself
                    with accelerator.autocast():
                        loss = textbook_dpo_step(policy, reference, batch, cfg.beta,
                                                 backward=False).loss
                else:
                    loss = dpo_step(accelerator, cfg, policy, reference, batch).losses.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            # Counted on the device: read back once, with the loss, when the step's work is done.
            tokens = tokens + batch["attention_mask"].sum()
            positions += batch["attention_mask"].numel()
            model_flops = model_flops + flops.forward(batch) * (3 + (reference is not None))
        return int(tokens), positions, float(model_flops), loss.item()

    def epoch_steps():
        batches = iter(loader)
        for _ in range(args.steps):
            # Drawn one by one as the step runs, as in train.py: accelerate ends the
            # accumulation early if the loader's last batch is fetched before the others ran.
            yield (next(batches) for _ in range(args.grad_accum))

    for step_batches, _ in zip(epoch_steps(), range(args.warmup)):
        optimizer_step(step_batches)
    matmul_before = matmul_flops(device, compute_dtype(args, device), args.matmul_size)
    reset_peak_memory(device)
    times, tokens, positions, model_flops, loss = [], 0, 0, 0.0, float("nan")
    for step_batches in epoch_steps():  # the whole epoch, from its first batch again
        sync(device)
        start = time.perf_counter()
        step_tokens, step_positions, step_flops, loss = optimizer_step(step_batches)
        sync(device)
        times.append(time.perf_counter() - start)
        tokens, positions = tokens + step_tokens, positions + step_positions
        model_flops += step_flops
    peak_rss, peak_gpu = peak_memory(device)
    matmul = max(matmul_before, matmul_flops(device, compute_dtype(args, device),
                                             args.matmul_size))
    if args.profile:
        profile_step(optimizer_step, next(epoch_steps()), device)

    total = sum(times)
    return {
        "impl": impl, "shape": args.shape, "vocab_size": config.vocab_size,
        "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 1),
        "device": device.type, "threads": torch.get_num_threads(),
        "mixed_precision": args.mixed_precision, "attn": args.attn_implementation,
        "max_length": args.max_length, "pairs_per_step": global_batch, "steps": args.steps,
        "s_per_step": round(statistics.median(times), 4),
        "tokens_per_s": round(tokens / total, 1),
        "padding_fraction": round(1 - tokens / positions, 4),
        "peak_rss_mib": round(peak_rss, 1),
        "peak_gpu_mib": None if peak_gpu is None else round(peak_gpu, 1),
        "model_gflop_per_step": round(model_flops / len(times) / 1e9, 2),
        "achieved_gflops": round(model_flops / total / 1e9, 2),
        "matmul_gflops": round(matmul / 1e9, 2),
        "flop_utilisation": round(model_flops / total / matmul, 4),
        "mfu_vs_peak": (None if args.peak_tflops is None
                        else round(model_flops / total / (args.peak_tflops * 1e12), 4)),
        "precompute_s": None if precompute_s is None else round(precompute_s, 2),
        "loss_last": round(loss, 6),
    }



def profile_step(optimizer_step, batches, device) -> None:
    """Print the top operators of one optimizer step by self time (to stderr)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        optimizer_step(batches)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30), file=sys.stderr)




def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.compare:
        result = run(args, args.impl)
        print_table([result])
        print(json.dumps(result))
        return
    argv = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--compare"]
    results = {}
    for impl in args.impls:
        child = run_child(__file__, [*argv, "--impl", impl])
        if child.returncode:
            sys.exit(f"--impl {impl} failed:\n{child.stderr[-3000:]}")
        if args.profile:
            print(child.stderr, file=sys.stderr)
        results[impl] = json.loads(child.stdout.strip().splitlines()[-1])
    print_table(list(results.values()))
    summary = ratios(results)
    print_ratios(summary, next(iter(results.values()))["device"])
    print(json.dumps({"runs": list(results.values()), **summary}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
