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
`--compare` runs each implementation in a fresh subprocess, so each peak memory is its own, and
prints the ratios against the plain one and the issue's targets.

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
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("plain", "optimized", "precomputed")
# The targets, printed beside the measured ratios.
TARGET_SPEEDUP = 1.3  # optimized tokens/s over plain
TARGET_PRECOMPUTED = 1.25  # optimized s/step over precomputed s/step
TARGET_MEMORY = 0.6  # optimized peak over plain, at Qwen3's vocabulary
TARGET_UTILISATION_CPU, TARGET_UTILISATION_GPU = 0.60, 0.45

# Published shapes; the weights are random. SmolLM2-135M is a Llama, Qwen3-0.6B a Qwen3.
SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True, max_position_embeddings=8192,
                                   rms_norm_eps=1e-5, rope_theta=100000.0)),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 vocab_size=151936, tie_word_embeddings=True,
                                 max_position_embeddings=40960, rms_norm_eps=1e-6,
                                 rope_theta=1000000.0)),
}


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
# Model, data, FLOPs
# --------------------------------------------------------------------------------------------


def model_config(shape: str, vocab_size: int | None):
    """The transformers config of a named shape, dropout off as in `dpo.model.loading`."""
    from transformers import LlamaConfig, Qwen3Config

    from dpo.demo import MODEL_CONFIG
    from dpo.demo.tiny import tiny_qwen3_config

    if shape == "tiny":
        return tiny_qwen3_config(vocab_size or 1024, **MODEL_CONFIG)
    family, dims = SHAPES[shape]
    dims = {**dims, "vocab_size": vocab_size or dims["vocab_size"]}
    return (LlamaConfig if family == "llama" else Qwen3Config)(**dims, attention_dropout=0.0)


def synthetic_pairs(num_pairs: int, vocab_size: int, max_length: int, seed: int):
    """Tokenized pairs of random tokens; prompt and responses each in [L/16, L/2] tokens."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    low, high = max(1, max_length // 16), max_length // 2
    rows = []
    for i in range(num_pairs):
        prompt = rng.integers(0, vocab_size, rng.integers(low, high + 1)).tolist()
        chosen, rejected = (rng.integers(0, vocab_size, rng.integers(low, high + 1)).tolist()
                            for _ in range(2))
        rows.append({"chosen_input_ids": prompt + chosen,
                     "chosen_labels": [-100] * len(prompt) + chosen,
                     "rejected_input_ids": prompt + rejected,
                     "rejected_labels": [-100] * len(prompt) + rejected,
                     "length": len(prompt) + max(len(chosen), len(rejected)), "row_index": i})
    return Dataset.from_list(rows)


def load_pairs(args, num_pairs: int):
    """(tokenized pairs, pad id, vocab size the data needs)."""
    from transformers import AutoTokenizer

    from dpo import data, demo

    if args.synthetic:
        vocab = model_config(args.shape, args.vocab_size).vocab_size
        return synthetic_pairs(num_pairs, vocab, args.max_length, args.seed), 0, vocab
    tokenizer_path = args.tokenizer or (demo.resolve_model(demo.BUILTIN_MODEL)
                                        if args.dataset == demo.BUILTIN_DATASET else None)
    if tokenizer_path is None:
        sys.exit("error: --dataset other than the demo needs --tokenizer")
    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer_path))
    rows, _ = data.load_preference_splits(demo.resolve_dataset(args.dataset),
                                          num_samples=num_pairs, eval_samples=0, seed=args.seed)
    pairs, _ = data.tokenize_preferences(rows, tokenizer, max_length=args.max_length)
    if len(pairs) < num_pairs:
        sys.exit(f"error: {args.dataset} has {len(pairs)} usable pairs, the run needs "
                 f"{num_pairs}; lower --steps or --batch-size")
    return pairs, tokenizer.pad_token_id, len(tokenizer)


class FlopCounter:
    """Useful model FLOPs of a batch (see the module docstring)."""

    def __init__(self, model):
        from torch import nn

        head = model.get_output_embeddings()
        config = model.config
        self.matmul_params = sum(m.weight.numel() for m in model.modules()
                                 if isinstance(m, nn.Linear) and m is not head)
        self.head_params = head.weight.numel()
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size
                                                         // config.num_attention_heads)
        self.attention = 2 * config.num_hidden_layers * config.num_attention_heads * head_dim

    def forward(self, batch):
        """FLOPs of one forward over `batch`, a device scalar: no host sync inside the step."""
        lengths = batch["attention_mask"].sum(1).double()
        responses = (batch["labels"][:, 1:] != -100).sum().double()
        return (2 * self.matmul_params * lengths.sum() + 2 * self.head_params * responses
                + self.attention * (lengths ** 2).sum())


def matmul_flops(device, dtype, size: int, repeats: int = 5) -> float:
    """Dense matmul FLOP/s of the device: best of `repeats` timings of a few n×n×n products."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * size ** 3 / best


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    """Start a new peak: the reset makes VmHWM the current RSS (Linux); GPU stats likewise."""
    import torch

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap (e.g. the reference) back
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then covers the whole process
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> tuple[float, float | None]:
    """(peak RSS MiB since the last reset, peak allocated GPU MiB or None)."""
    import torch

    try:
        status = Path("/proc/self/status").read_text()
        rss = int(next(line for line in status.splitlines()
                       if line.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return rss, gpu


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


def compute_dtype(args, device):
    """The dtype the step's matmuls run in: bf16 under bf16 autocast, else fp32."""
    import torch

    return torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32


def profile_step(optimizer_step, batches, device) -> None:
    """Print the top operators of one optimizer step by self time (to stderr)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        optimizer_step(batches)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30), file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

COLUMNS = (("impl", "impl", "{}"), ("s/step", "s_per_step", "{:.3f}"),
           ("tokens/s", "tokens_per_s", "{:.0f}"), ("padding", "padding_fraction", "{:.1%}"),
           ("peak RSS MiB", "peak_rss_mib", "{:.0f}"), ("GFLOP/step", "model_gflop_per_step",
                                                         "{:.1f}"),
           ("GFLOP/s", "achieved_gflops", "{:.1f}"), ("matmul GFLOP/s", "matmul_gflops",
                                                      "{:.1f}"),
           ("FLOP util", "flop_utilisation", "{:.1%}"), ("precompute s", "precompute_s", "{}"))
MFU_COLUMN = ("MFU vs peak", "mfu_vs_peak", "{:.1%}")


def print_table(results: list[dict]) -> None:
    first = results[0]
    print(f"shape {first['shape']} ({first['params_m']}M params, vocab {first['vocab_size']}), "
          f"device {first['device']} x{first['threads']} threads, mixed precision "
          f"{first['mixed_precision']}, attention {first['attn']}, max length "
          f"{first['max_length']}, {first['pairs_per_step']} pairs/step, {first['steps']} timed "
          f"steps")
    columns = list(COLUMNS)
    if first["peak_gpu_mib"] is not None:
        columns.insert(5, ("peak GPU MiB", "peak_gpu_mib", "{:.0f}"))
    if first["mfu_vs_peak"] is not None:
        columns.append(MFU_COLUMN)
    cells = [[name for name, _, _ in columns]]
    for r in results:
        cells.append(["-" if r[key] is None else fmt.format(r[key]) for _, key, fmt in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def ratios(results: dict[str, dict]) -> dict:
    """The issue's ratios, where the runs needed for each were made."""
    out = {}
    plain, opt, pre = (results.get(name) for name in IMPLS)
    if plain and opt:
        out["speedup_tokens_per_s_vs_plain"] = round(opt["tokens_per_s"] / plain["tokens_per_s"],
                                                     3)
        out["peak_rss_vs_plain"] = round(opt["peak_rss_mib"] / plain["peak_rss_mib"], 3)
        if opt["peak_gpu_mib"] is not None:
            out["peak_gpu_vs_plain"] = round(opt["peak_gpu_mib"] / plain["peak_gpu_mib"], 3)
    if opt:
        out["optimized_flop_utilisation"] = opt["flop_utilisation"]
    if opt and pre:
        out["precomputed_step_speedup"] = round(opt["s_per_step"] / pre["s_per_step"], 3)
    if plain and pre:
        out["precomputed_tokens_per_s_vs_plain"] = round(
            pre["tokens_per_s"] / plain["tokens_per_s"], 3)
    return out


def print_ratios(values: dict, device: str) -> None:
    targets = {"speedup_tokens_per_s_vs_plain": (">=", TARGET_SPEEDUP),
               "precomputed_step_speedup": (">=", TARGET_PRECOMPUTED),
               "peak_rss_vs_plain": ("<=", TARGET_MEMORY),
               "peak_gpu_vs_plain": ("<=", TARGET_MEMORY)}
    for key, value in values.items():
        if key == "optimized_flop_utilisation":
            continue
        line = f"{key}: {value:.3f}"
        if key in targets:
            op, target = targets[key]
            met = value >= target if op == ">=" else value <= target
            line += f"  (target {op} {target}: {'met' if met else 'NOT met'})"
            if key.startswith("peak"):
                line += " [the target is for Qwen3's vocabulary, 151669]"
        print(line)
    target = TARGET_UTILISATION_GPU if device == "cuda" else TARGET_UTILISATION_CPU
    if "optimized_flop_utilisation" in values:
        value = values["optimized_flop_utilisation"]
        print(f"optimized FLOP utilisation {value:.1%} of the measured matmul rate (target >= "
              f"{target:.0%} on {device}: {'met' if value >= target else 'NOT met'})")


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
        child = subprocess.run([sys.executable, __file__, *argv, "--impl", impl], cwd=ROOT,
                               capture_output=True, text=True)
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
