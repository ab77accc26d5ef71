"""Acceptance on one CUDA card: the project's numerics there, and a throughput table.

    python bench/gpu_acceptance.py                    # every part, on the card (< 10 minutes)
    python bench/gpu_acceptance.py --parts bf16,layouts --peak-tflops 989
    python bench/gpu_acceptance.py --shape tiny --steps 1 --pairs-per-step 4 --micro-batch 2

It runs on CPU too (CI does, tests/test_bench.py): the parts that need CUDA, or a package that is
not installed, print `skip` with the reason. Each part prints one row, part / ok, FAIL or skip /
detail (what it measured against its tolerance, or why it skipped); the last line of stdout is
one JSON object {"parts": [...], "throughput": [...], "device", "torch", "date"}. The exit code
is 1 if any part FAILs.

The numerics parts use the demo's tiny Qwen3 shape (2 layers, hidden 64; vocabulary 256, random
weights, seeded) on 4 synthetic pairs of at most 64 tokens, through the project's own step
(`dpo_step`: `concatenated_forward`, the chunked head, the sigmoid loss, beta 0.1), with a
reference of other random weights so that the loss is not ln 2. "Measured on CPU" is what this
machine's CPU gave; the tolerances leave a margin above it.

- bf16: log-probs, DPO loss and every parameter's gradient under bf16 autocast against fp32.
  Tolerance: log-probs rel <= 1e-3, loss rel <= 5e-3, gradient global rel norm <= 3e-2, every
  parameter's gradient cosine >= 0.99. Measured on CPU (4 seeds): log-probs <= 8.5e-5, loss
  <= 4.8e-4, gradient norm <= 6.8e-3, cosine >= 0.9999.
- fp16: 4 AdamW steps under fp16 autocast with torch.amp.GradScaler: no step skipped after
  the first; the first finite step's unscaled gradients (still at the initial weights: a
  skipped step changes nothing) against fp32: log-probs rel <= 5e-4, loss rel <= 1e-3,
  gradient rel norm <= 1e-2, cosine >= 0.995. Measured on CPU (4 seeds): log-probs <= 1.2e-5,
  loss <= 2.7e-5, gradient norm <= 9e-4; scale 65536, no step skipped. Skips ("needs CUDA")
  where this CPU's torch cannot run fp16 autocast.
- layouts: padded against packed (padding-free), shared-prompt and shared-prompt packed
  (`PreferenceCollator(padding_free=, share_prompt=)`): log-probs and every gradient within
  1e-5 relative in fp32 (a gradient: max |diff| over the parameter's max |g|), and under bf16
  against bf16 padded within the bf16 part's log-prob and gradient-norm tolerances. Measured on
  CPU: fp32 <= 9.8e-7; bf16 log-probs <= 3.9e-5, gradient norm <= 3.7e-3 (4 seeds).
- lora (needs peft): a LoRA adapter (`dpo.model.lora.lora_config`, r 8, the reference the
  adapter-off view) and one AdamW step: loss ln 2 (B = 0) and finite, lower after the step
  (CPU: 0.6931 -> 0.6589), the adapter's B matrices changed, no base weight changed.
- 4bit (CUDA, bitsandbytes and peft): the tiny model saved, loaded 4-bit by `load_peft_policy`
  (nf4, bf16 compute) with a LoRA adapter, one step as for lora; its log-probs within 5e-2
  relative of the model's under bf16 autocast (loose: nf4 rounds every weight). Not yet run on
  a card.
- zero2, zero3 (needs deepspeed): `accelerate launch --use_deepspeed --zero_stage N
  --num_processes 1` (gloo on CPU) runs 2 optimizer steps of the real step (fp32, lr 1e-4,
  clipping at 1.0, policy = reference at the start); the first step's log-probs and the second
  step's loss and log-probs within 1e-4 relative of the same run without DeepSpeed. Measured on
  CPU: ZeRO-2 equal bit for bit, ZeRO-3 <= 2.8e-7; about 13 s each. Their children start with
  the run and go on beside the parts before them (numbers compared, not timed); the throughput
  part, which is timed, starts after they have ended.
- throughput: the `--shape` (random weights; on CPU only `--shape tiny`), bf16 autocast on
  CUDA, fp32 on CPU, synthetic pairs (a shared prompt and two responses each, up to
  `--max-length`), layouts padded, packed and shared-prompt packed, each in its own process
  (its own peak memory) running `train.py`'s step with an Accelerator: `--pairs-per-step` pairs
  per optimizer step in micro-batches of `--micro-batch`. Per layout: s/step, the real tokens it
  computes (a shared prompt once) per step and per second, pairs/s (comparable across layouts),
  peak RSS and GPU memory, model TFLOP/s and MFU. Model FLOPs, simplified: 8 per non-embedding
  matmul weight and computed token (policy forward + backward 6, reference forward 2), the LM
  head on response tokens only (the chunked head computes no other); attention scores are not
  counted. MFU divides by `--peak-tflops` (the card's dense bf16 datasheet peak), else by the
  dense matmul rate measured here (bf16 8192^3 on CUDA; fp32 512^3 on CPU).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from benchlib.common import SHAPES  # noqa: E402

PARTS = ["bf16", "fp16", "layouts", "lora", "4bit", "zero2", "zero3", "throughput"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="qwen3-0.6b",
                        help="the throughput part's model shape (random weights)")
    parser.add_argument("--pairs-per-step", type=int, default=32,
                        help="pairs per optimizer step (throughput)")
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="pairs per micro-batch; the accumulation is pairs-per-step / this")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--peak-tflops", type=float,
                        help="the card's dense bf16 peak for MFU (default: the matmul rate "
                             "measured here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # zeroN or throughput:LAYOUT
    args = parser.parse_args(argv)
    given = {p.strip() for p in args.parts.split(",") if p.strip()}
    if unknown := given - set(PARTS):
        parser.error(f"--parts: unknown {sorted(unknown)}")
    # In PARTS' order, whatever the order given: throughput, which is timed, runs last, once
    # the zero parts' children (started at once) have ended.
    args.parts = [p for p in PARTS if p in given]
    if args.micro_batch < 1 or args.pairs_per_step % args.micro_batch:
        parser.error("--pairs-per-step must be a multiple of --micro-batch")
    if min(args.steps, args.max_length) < 1 or args.warmup < 0:
        parser.error("--steps and --max-length must be >= 1, --warmup >= 0")
    return args


def run_part(name: str, args, device, argv: list[str]) -> tuple[dict, list[dict]]:
    """The part's row (and the throughput table's rows): skip with the reason it gave, FAIL
    with the exception's last line if it raised."""
    from benchlib import acceptance, acceptance_runs

    script = Path(__file__).resolve()
    start = time.perf_counter()
    try:
        if name == "throughput":
            row, table = acceptance_runs.part_throughput(args, device, argv, script)
        elif name.startswith("zero"):
            row, table = acceptance_runs.part_zero(args, device, int(name[4:]), script), []
        else:
            row, table = getattr(acceptance, f"part_{name}")(args, device), []
    except acceptance.Skip as e:
        row, table = {"part": name, "status": "skip", "detail": str(e)}, []
    except Exception as e:  # noqa: BLE001 -- a failing part is a row, the others still run
        lines = str(e).strip().splitlines() or [""]
        row, table = {"part": name, "status": "FAIL",
                      "detail": f"{type(e).__name__}: {lines[-1][:300]}"}, []
    row.setdefault("seconds", round(time.perf_counter() - start, 1))
    return row, table


def print_throughput(rows: list[dict], device_name: str) -> None:
    first = rows[0]
    print(f"\nthroughput: shape {first['shape']}, {device_name}, mixed precision "
          f"{first['mixed_precision']}, {first['pairs_per_step']} pairs/step "
          f"({first['micro_batch']} x {first['accumulation']}), max length "
          f"{first['max_length']}, {first['steps']} timed steps")
    print(f"{'layout':>14} {'s/step':>8} {'tokens/step':>12} {'tokens/s':>10} {'pairs/s':>8} "
          f"{'TFLOP/s':>8} {'MFU':>7} {'peak RSS MiB':>13} {'peak GPU MiB':>13}")
    for r in rows:
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        print(f"{r['layout']:>14} {r['s_per_step']:8.3f} {r['tokens_per_step']:12.0f} "
              f"{r['tokens_per_s']:10.0f} {r['pairs_per_s']:8.2f} "
              f"{r['model_tflops_per_s']:8.3g} {r['mfu']:7.2%} {r['peak_rss_mib']:13.0f} "
              f"{gpu:>13}")


def main(argv=None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.child:  # a part's own process: its one JSON line
        from benchlib import acceptance_runs

        if args.child.startswith("zero"):
            out = acceptance_runs.zero_run()
        else:
            out = acceptance_runs.throughput_run(args, args.child.split(":", 1)[1])
        print(json.dumps(out))
        return 0
    import torch

    if importlib.util.find_spec("deepspeed"):  # accelerate imports it on first use, and it
        import deepspeed  # noqa: F401 -- logs a line to stdout on import: before the table
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'part':<11} {'status':<6} detail", flush=True)
    from benchlib import acceptance_runs

    acceptance_runs.start_zero([int(p[4:]) for p in args.parts if p.startswith("zero")],
                               Path(__file__).resolve())
    parts, throughput = [], []
    for name in args.parts:
        row, table = run_part(name, args, device, argv)
        parts.append(row)
        throughput += table
        print(f"{name:<11} {row['status']:<6} {row['detail']}", flush=True)
    if throughput:
        print_throughput(throughput, device_name)
    print(json.dumps({"parts": parts, "throughput": throughput, "device": device_name,
                      "torch": torch.__version__,
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                          timespec="seconds")}))
    return 1 if any(row["status"] == "FAIL" for row in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
