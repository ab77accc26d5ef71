"""Padded against padding-free batches, and what gradient checkpointing costs and saves.

Runs the real DPO step (`dpo_step`, `accelerator.backward`, clipping, AdamW inside
`accelerator.accumulate`, the live reference) on a randomly initialised model of a named shape
(default SmolLM2-135M), on natural-length HH-RLHF pairs: the first `--max-length` tokens of each
sequence, no filtering by length, length-grouped batches as `train.py` makes them. The pairs are
tokenized with the Llama-3.1 tokenizer and their ids folded into the shape's vocabulary (the
weights are random: only the lengths matter). Each variant runs in its own subprocess, so each
peak memory is its own, on the same pairs in the same order:

- padded: today's default (right-padded `[chosen; rejected]` rows, mask-free causal attention);
- padding-free: `--padding-free`, the micro-batch's sequences packed in one row;
- ckpt-full: padded, with `--gradient-checkpointing` (every decoder layer recomputed);
- ckpt-mlp: padded, only the MLP blocks recomputed (their activations are the largest);
- ckpt-alternate: padded, every other decoder layer recomputed.

Per variant: median s/step, real tokens/s, padding fraction, peak RSS (after the warm-up), and
for padding-free the ideal gain 1 / (1 − padded padding fraction) beside the measured tokens/s
gain; for the checkpointing mixes, speed and peak memory relative to no checkpointing.

On a GPU, also peak allocated GPU memory and MFU: the model FLOPs of the real tokens (padding
counts for nothing) over the card's datasheet peak (`--peak-tflops`, known for H100/H200). Per
step: the policy's forward and backward (6·N per token, N the body's non-embedding parameters)
and the reference's forward (2·N), the LM head on response tokens only (8·H·V per token; the
chunked head's recomputation is not counted: it is not useful work), and causal attention
(2·layers·s²·heads·head_dim per sequence of s tokens and forward; ×3 for the policy, ×1 for the
reference). Mixed precision comes from Accelerate (`ACCELERATE_MIXED_PRECISION=bf16`).

    python bench/padding_free.py                       # SmolLM2-135M shape, CPU fp32
    ACCELERATE_MIXED_PRECISION=bf16 python bench/padding_free.py --shape qwen3-0.6b  # on a GPU
    python bench/padding_free.py --shape tiny --steps 1 --warmup 0 --variants padded,padding-free
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib.common import (SHAPES, enable_checkpointing, model_config,  # noqa: E402
                             peak_memory, reset_peak_memory, run_child, train_micro_batch)

SHARED = Path(os.environ.get("DPO_SHARED") or ROOT.parent / "shared")
DATA = SHARED / "data" / "hh_rlhf_helpful_base_test.jsonl.gz"
TOKENIZER = SHARED / "tokenizers" / "llama3_1"
# variant: (padding_free, gradient checkpointing: None, "full", "mlp" or "alternate")
VARIANTS = {"padded": (False, None), "padding-free": (True, None),
            "ckpt-full": (False, "full"), "ckpt-mlp": (False, "mlp"),
            "ckpt-alternate": (False, "alternate")}
# Dense bf16 datasheet peaks (TFLOP/s) of the cards a name identifies (SXM parts).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
# The bars: a padding-free default needs >= 1.05x, a checkpointing mix >= 85% of the
# speed without checkpointing at <= 60% of its peak memory.
DEFAULT_GAIN, MIX_SPEED, MIX_MEMORY = 1.05, 0.85, 0.60


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="smollm2-135m")
    parser.add_argument("--data", default=str(DATA), help="HH-RLHF-style .jsonl(.gz) pairs")
    parser.add_argument("--tokenizer", default=str(TOKENIZER))
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}, interleaved")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float,
                        help="the accelerator's peak (default: by name, for MFU on a GPU)")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",")]
    if unknown := set(args.variants) - {*VARIANTS, "interleaved"}:
        parser.error(f"--variants: unknown {sorted(unknown)}")
    return args


def load_pairs(args, num_pairs: int, vocab_size: int):
    """(tokenized pairs, the split's padding fraction under the sampler, pad id)."""
    from transformers import AutoTokenizer

    from dpo import data

    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
    rows, _ = data.load_preference_splits(args.data, num_samples=num_pairs, eval_samples=0,
                                          seed=args.seed)
    pairs, _ = data.tokenize_preferences(rows, tokenizer, max_length=args.max_length,
                                         chat_template="plain")
    fold = {name: [[t % vocab_size if t >= 0 else t for t in ids] for ids in pairs[name]]
            for side in ("chosen", "rejected") for name in (f"{side}_input_ids",
                                                            f"{side}_labels")}
    for name, column in fold.items():
        pairs = pairs.remove_columns(name).add_column(name, column)
    return pairs, tokenizer.pad_token_id % vocab_size


def model_flops(config, batch) -> float:
    """Useful FLOPs of one micro-batch's DPO step (policy forward + backward, reference forward):
    real tokens only, see the module docstring."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    attention = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    mlp = 3 * hidden * config.intermediate_size
    body = layers * (2 * hidden * attention + 2 * hidden * kv + mlp)  # projections and MLP
    packed = batch.get("packed_sequences")
    lengths = (packed[:, 2] if packed is not None else batch["attention_mask"].sum(-1)).double()
    tokens = float(lengths.sum())
    responses = float((batch["labels"] != -100).sum())
    attention_flops = 2 * layers * attention * float(lengths.square().sum())
    return 8 * body * tokens + 8 * hidden * config.vocab_size * responses + 4 * attention_flops


def run(args, variant: str) -> dict:
    """Warm-up steps, then `args.steps` timed optimizer steps of one variant; its figures.

    The variant "interleaved" runs each step padded and then packed, on the same pairs, in one
    process: the ratio of the two times is immune to the machine's load changing between the
    variants' processes (its peak memory is not either variant's)."""
    import torch
    from accelerate.utils import extract_model_from_parallel, set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from dpo import data
    from dpo.config import TrainConfig
    from dpo.model.probes import settle_logps_path
    from dpo.model.loading import prepare_reference
    from dpo.train.runtime import make_accelerator, make_optimizer

    interleaved = variant == "interleaved"
    padding_free, checkpointing = VARIANTS["padding-free" if interleaved else variant]
    cfg = TrainConfig(model=f"random:{args.shape}", seed=args.seed, batch_size=args.batch_size,
                      gradient_accumulation_steps=args.grad_accum, max_length=args.max_length,
                      attn_implementation=args.attn_implementation, padding_free=padding_free,
                      output_dir=str(ROOT / "outputs" / "bench_padding_free"))
    accelerator = make_accelerator(cfg)
    global_batch = args.batch_size * args.grad_accum
    set_seed(args.seed)
    config = model_config(args.shape, None)
    pairs, pad_id = load_pairs(args, (args.steps + args.warmup) * global_batch,
                               config.vocab_size)
    policy = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if checkpointing:
        enable_checkpointing(policy, checkpointing)
    optimizer = make_optimizer(cfg, policy)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    cfg = settle_logps_path(accelerator, cfg, policy)  # the padding-free probe, as train.py
    reference = prepare_reference(accelerator, reference)
    sampler = data.LengthGroupedBatchSampler(pairs["length"], micro_batch_size=args.batch_size,
                                             global_batch_size=global_batch, seed=args.seed)
    modes = (False, True) if interleaved else (padding_free,)
    loaders = {mode: iter(accelerator.prepare(DataLoader(
        pairs, batch_sampler=sampler, collate_fn=data.PreferenceCollator(
            pad_id, padding_free=mode, max_packed_tokens=cfg.padding_free_max_tokens))))
        for mode in modes}
    policy.train()

    def optimizer_step(batches) -> tuple[int, int, float, float]:
        tokens = positions = flops = 0
        for _ in range(args.grad_accum):
            batch = next(batches)
            loss = train_micro_batch(accelerator, cfg, policy, reference, optimizer, batch)
            tokens += int(batch["attention_mask"].sum())
            positions += batch["attention_mask"].numel()
            flops += model_flops(config, batch)
        return tokens, positions, loss.item(), flops

    for _ in range(args.warmup):
        for mode in modes:
            optimizer_step(loaders[mode])
    reset_peak_memory(accelerator.device)
    times = {mode: [] for mode in modes}
    tokens = {mode: 0 for mode in modes}
    positions = {mode: 0 for mode in modes}
    flops = {mode: 0.0 for mode in modes}
    losses = []
    for _ in range(args.steps):
        for mode in modes:
            start = time.perf_counter()
            step_tokens, step_positions, loss, step_flops = optimizer_step(loaders[mode])
            times[mode].append(time.perf_counter() - start)  # loss.item() synchronised
            flops[mode] += step_flops
            tokens[mode] += step_tokens
            positions[mode] += step_positions
            losses.append(loss)
    peak_rss, peak_gpu = peak_memory(accelerator.device)
    peak_tflops = args.peak_tflops
    if peak_tflops is None and accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    out = {"variant": variant, "shape": args.shape, "threads": torch.get_num_threads(),
           "device": (torch.cuda.get_device_name(accelerator.device)
                      if accelerator.device.type == "cuda" else "cpu"),
           "mixed_precision": str(accelerator.mixed_precision),
           "attention": extract_model_from_parallel(policy).config._attn_implementation,
           "peak_gpu_mib": None if peak_gpu is None else round(peak_gpu, 1),
           "pairs_per_step": global_batch, "steps": args.steps, "max_length": args.max_length,
           "peak_rss_mib": round(peak_rss, 1), "losses": [round(x, 6) for x in losses]}
    for mode in modes:
        suffix = "_padding_free" if interleaved and mode else "_padded" if interleaved else ""
        out.update({f"s_per_step{suffix}": round(statistics.median(times[mode]), 3),
                    f"tokens_per_s{suffix}": round(tokens[mode] / sum(times[mode]), 1),
                    f"padding_fraction{suffix}": round(1 - tokens[mode] / positions[mode], 4),
                    f"model_tflops_per_s{suffix}": round(flops[mode] / sum(times[mode]) / 1e12, 2)})
        if peak_tflops:
            out[f"mfu{suffix}"] = round(flops[mode] / sum(times[mode]) / 1e12 / peak_tflops, 4)
    if interleaved:  # per step, packed over padded tokens/s (the same tokens): time ratios
        out["step_gains"] = [round(a / b, 3) for a, b in zip(times[False], times[True])]
    return out


def summarise(results: dict[str, dict]) -> dict:
    out = {}
    padded, free = results.get("padded"), results.get("padding-free")
    if padded and free:
        out["ideal_gain"] = round(1 / (1 - padded["padding_fraction"]), 3)
        out["measured_gain"] = round(free["tokens_per_s"] / padded["tokens_per_s"], 3)
        out["share_of_ideal"] = round((out["measured_gain"] - 1) / (out["ideal_gain"] - 1), 3) \
            if out["ideal_gain"] > 1 else None
        out["peak_rss_padding_free_vs_padded"] = round(
            free["peak_rss_mib"] / padded["peak_rss_mib"], 3)
        out["meets_default_bar"] = out["measured_gain"] >= DEFAULT_GAIN
    if "interleaved" in results:
        gains = results["interleaved"]["step_gains"]
        out["interleaved_gain_median"] = round(statistics.median(gains), 3)
        out["interleaved_ideal_gain"] = round(
            1 / (1 - results["interleaved"]["padding_fraction_padded"]), 3)
    for name in ("ckpt-full", "ckpt-mlp", "ckpt-alternate"):
        if padded and name in results:
            speed = round(padded["s_per_step"] / results[name]["s_per_step"], 3)
            memory = round(results[name]["peak_rss_mib"] / padded["peak_rss_mib"], 3)
            out[name] = {"speed_vs_none": speed, "peak_rss_vs_none": memory,
                         "meets_bar": speed >= MIX_SPEED and memory <= MIX_MEMORY}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run(args, args.variant)))
        return
    argv = sys.argv[1:] if argv is None else argv
    results = {}
    for variant in args.variants:
        child = run_child(__file__, [*argv, "--variant", variant])
        if child.returncode:
            sys.exit(f"{variant} failed:\n{child.stderr[-3000:]}")
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]), flush=True)
    first = next(iter(results.values()))
    print(f"\nshape {first['shape']}, {first['device']}, {first['threads']} threads, "
          f"mixed precision {first['mixed_precision']}, max length "
          f"{first['max_length']}, {first['pairs_per_step']} pairs/step, {first['steps']} timed "
          "steps, HH-RLHF helpful-base test pairs")
    print(f"{'variant':>15} {'s/step':>8} {'tokens/s':>9} {'padding':>8} {'peak RSS MiB':>13} "
          f"{'peak GPU MiB':>13} {'MFU':>6}")
    for r in results.values():
        if r["variant"] == "interleaved":
            print(f"interleaved, packed over padded tokens/s per step: {r['step_gains']}")
            continue
        print(f"{r['variant']:>15} {r['s_per_step']:8.2f} {r['tokens_per_s']:9.1f} "
              f"{r['padding_fraction']:8.1%} {r['peak_rss_mib']:13.0f} "
              f"{r['peak_gpu_mib'] or 0:13.0f} {r.get('mfu') or 0:6.1%}")
    summary = summarise(results)
    print(json.dumps({"runs": list(results.values()), **summary}))


if __name__ == "__main__":
    main()
