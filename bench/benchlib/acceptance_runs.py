"""The parts of `bench/gpu_acceptance.py` that run in processes of their own: zero2/zero3 (under
`accelerate launch --use_deepspeed`) and throughput (one process per layout, so that each peak
memory is its own). Both run the real training step: `dpo_step`, `accelerator.backward`,
clipping and AdamW inside `accelerator.accumulate`, as `train.py` does.

A child prints one JSON line last; the parent reads it (`_result`). The throughput children are
forked where they can be (`benchlib.common.run_child`); the zero parts' children are launched by
`accelerate launch`, as their claim is the launcher's DeepSpeed setup.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ZERO_STEPS, ZERO_LR, ZERO_RTOL = 2, 1e-4, 1e-4
# layout: (padding_free, share_prompt)
THROUGHPUT_LAYOUTS = {"padded": (False, False), "packed": (True, False),
                      "shared-packed": (True, True)}


class Child:
    """A child process started now and read later (`result`): the zero parts' children run
    beside this process's own parts, whose numbers are compared, never timed. Its output goes to
    files, so that a child that writes much never blocks on a full pipe."""

    def __init__(self, command: list[str], env: dict | None = None):
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.out,
                                     stderr=self.err, text=True)

    def result(self, timeout: int = 600) -> dict:
        """The last JSON line it printed; RuntimeError with its stderr's end if it failed."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        stdout, stderr = (f.seek(0) or f.read() for f in (self.out, self.err))
        return _result(subprocess.CompletedProcess(self.proc.args, code, stdout, stderr))


def _result(child: subprocess.CompletedProcess) -> dict:
    """The last JSON line a child printed; RuntimeError with its stderr's end if it failed."""
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode or not lines:
        raise RuntimeError(f"exit code {child.returncode}: {child.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- zero2, zero3 --------------------------------------------------------------------------

def zero_run() -> dict:
    """`ZERO_STEPS` optimizer steps of the tiny model on one batch, policy = reference at the
    start, in whatever this process was launched under: each step's loss and log-probs."""
    import torch
    from accelerate.utils import DistributedType

    from benchlib.acceptance import collate, pair_rows, tiny_model, train_config
    from dpo.model.loading import prepare_reference
    from dpo.model.lora import whole_weights
    from dpo.train.runtime import make_accelerator, make_optimizer
    from dpo.train.step import dpo_step

    cfg = train_config(learning_rate=ZERO_LR)
    accelerator = make_accelerator(cfg)
    with whole_weights():  # under ZeRO-3, zero.Init would draw other weights than fp32's
        policy = tiny_model(0)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = make_optimizer(cfg, policy)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    reference = prepare_reference(accelerator, reference)
    batch = collate(pair_rows(), accelerator.device)
    policy.train()
    losses, logps = [], []
    for _ in range(ZERO_STEPS):
        with accelerator.accumulate(policy):
            out = dpo_step(accelerator, cfg, policy, reference, batch)
            loss = out.losses.mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
        logps.append(torch.cat([out.policy.chosen_logps, out.policy.rejected_logps]).tolist())
    stage = (accelerator.state.deepspeed_plugin.zero_stage
             if accelerator.distributed_type == DistributedType.DEEPSPEED else None)
    return {"losses": losses, "logps": logps, "zero_stage": stage}


_baseline: dict = {}
_started: dict[int, Child] = {}


def start_zero(stages: list[int], script: Path) -> None:
    """Start the children of the zero parts now (with deepspeed installed): their 10 s or so of
    start-up each then pass while this process runs its own parts."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        for stage in stages:
            _started[stage] = _zero_child(stage, script)


def _zero_child(stage: int, script: Path) -> Child:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
               "--zero_stage", str(stage), "--num_processes", "1", "--mixed_precision", "no",
               "--main_process_port", str(free_port()), str(script), "--child", f"zero{stage}"]
    return Child(command, env={**os.environ, "ACCELERATE_MIXED_PRECISION": "no"})


def part_zero(args, device, stage: int, script: Path) -> dict:
    """The first step's log-probs and the second step's loss and log-probs (after one update
    through DeepSpeed's optimizer and clipping) against the same run without DeepSpeed."""
    import importlib.util

    from benchlib.acceptance import Skip, rel

    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed not installed")
    child = _started.pop(stage, None) or _zero_child(stage, script)
    if not _baseline:
        with contextlib.redirect_stdout(io.StringIO()):  # the Accelerator's own lines
            _baseline.update(zero_run())
    start = time.perf_counter()
    got = child.result()
    want = _baseline
    numbers = {"step1_logps_rel": rel(got["logps"][0], want["logps"][0]),
               "step2_loss_rel": rel(got["losses"][1], want["losses"][1]),
               "step2_logps_rel": rel(got["logps"][1], want["logps"][1])}
    worst = max(numbers.values())
    if got["zero_stage"] != stage:  # DeepSpeed left out would pass the comparison trivially
        raise RuntimeError(f"the child ran under ZeRO stage {got['zero_stage']}, not {stage}")
    return {"part": f"zero{stage}", "status": "ok" if worst <= ZERO_RTOL else "FAIL",
            "detail": "vs no DeepSpeed: " + ", ".join(f"{k} {v:.1e}" for k, v in numbers.items())
                      + f" (<= {ZERO_RTOL:g}); step-2 loss {got['losses'][1]:.6f}",
            **numbers, "losses": got["losses"], "baseline_losses": want["losses"],
            "seconds": round(time.perf_counter() - start, 1)}


# --- throughput ----------------------------------------------------------------------------

def throughput_run(args, layout: str) -> dict:
    """Warm-up steps, then `args.steps` timed optimizer steps of one layout; its figures."""
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from benchlib.common import (FlopCounter, model_config, peak_memory, reset_peak_memory,
                                 synthetic_pairs, train_micro_batch)
    from dpo import data
    from dpo.config import TrainConfig
    from dpo.model.loading import prepare_reference
    from dpo.model.probes import settle_logps_path
    from dpo.train.loaders import make_collator
    from dpo.train.runtime import make_accelerator, make_optimizer

    padding_free, share_prompt = THROUGHPUT_LAYOUTS[layout]
    accumulation = args.pairs_per_step // args.micro_batch
    cfg = TrainConfig(model=f"random:{args.shape}", seed=args.seed, batch_size=args.micro_batch,
                      gradient_accumulation_steps=accumulation, max_length=args.max_length,
                      padding_free=padding_free, share_prompt=share_prompt,
                      output_dir=tempfile.gettempdir())
    accelerator = make_accelerator(cfg)
    set_seed(args.seed)
    config = model_config(args.shape, None)
    pairs = synthetic_pairs((args.warmup + args.steps) * args.pairs_per_step, config.vocab_size,
                            args.max_length, args.seed)
    policy = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    flops = FlopCounter(policy)
    optimizer = make_optimizer(cfg, policy)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    cfg = settle_logps_path(accelerator, cfg, policy)  # the layout probes, as train.py
    reference = prepare_reference(accelerator, reference)
    sampler = data.LengthGroupedBatchSampler(pairs["length"], micro_batch_size=args.micro_batch,
                                             global_batch_size=args.pairs_per_step,
                                             seed=args.seed)

    class PadId:  # make_collator reads the tokenizer's pad id only
        pad_token_id = 0

    batches = iter(accelerator.prepare(DataLoader(pairs, batch_sampler=sampler,
                                                  collate_fn=make_collator(cfg, PadId))))
    policy.train()
    times, tokens, responses, losses = [], 0, 0, []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            reset_peak_memory(accelerator.device)
        start = time.perf_counter()
        for _ in range(accumulation):
            batch = next(batches)
            loss = train_micro_batch(accelerator, cfg, policy, reference, optimizer, batch)
            if step >= args.warmup:  # device scalars: summed without a sync per micro-batch
                tokens = tokens + batch["attention_mask"].sum()
                responses = responses + (batch["labels"] != -100).sum()
        losses.append(loss.item())  # synchronises
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak_rss, peak_gpu = peak_memory(accelerator.device)
    tokens, responses, seconds = int(tokens), int(responses), sum(times)
    # Policy forward + backward (6 per weight and token) and the reference's forward (2): the
    # body on every token computed, the chunked head on response tokens only.
    model_flops = 8 * (flops.matmul_params * tokens + flops.head_params * responses)
    return {"layout": layout, "shape": args.shape, "mixed_precision": accelerator.mixed_precision,
            "pairs_per_step": args.pairs_per_step, "micro_batch": args.micro_batch,
            "accumulation": accumulation, "max_length": args.max_length, "steps": args.steps,
            "threads": torch.get_num_threads(),
            "s_per_step": round(statistics.median(times), 4),
            "tokens_per_step": round(tokens / args.steps, 1),
            "tokens_per_s": round(tokens / seconds, 1),
            "pairs_per_s": round(args.pairs_per_step * args.steps / seconds, 2),
            "model_tflops_per_s": model_flops / seconds / 1e12,
            "peak_rss_mib": round(peak_rss, 1),
            "peak_gpu_mib": None if peak_gpu is None else round(peak_gpu, 1),
            "losses": [round(x, 6) for x in losses]}


def part_throughput(args, device, argv: list[str], script: Path) -> tuple[dict, list[dict]]:
    """Each layout in a child process; MFU against `--peak-tflops` or the measured matmul rate."""
    import math

    import torch

    from benchlib.acceptance import Skip
    from benchlib.common import matmul_flops, run_child

    if device.type != "cuda" and args.shape != "tiny":
        raise Skip(f"the {args.shape} shape needs CUDA; --shape tiny runs it here")
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16" if device.type == "cuda" else "no"}
    rows = [_result(run_child(script, [*argv, "--child", f"throughput:{layout}"], env=env))
            for layout in THROUGHPUT_LAYOUTS]
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "datasheet peak (--peak-tflops)"
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        peak = matmul_flops(device, dtype, 8192 if device.type == "cuda" else 512)
        source = f"measured {str(dtype)[6:]} matmul rate"
    for row in rows:
        row["mfu"] = round(row["model_tflops_per_s"] * 1e12 / peak, 4)
        row["model_tflops_per_s"] = round(row["model_tflops_per_s"], 6)
    ok = all(r["tokens_per_s"] > 0 and all(map(math.isfinite, r["losses"])) for r in rows)
    base = rows[0]
    detail = (f"{len(rows)} layouts, {base['pairs_per_step']} pairs/step "
              f"({base['micro_batch']} x {base['accumulation']}), MFU vs {source} "
              f"{peak / 1e12:.3g} TFLOP/s")
    return ({"part": "throughput", "status": "ok" if ok else "FAIL", "detail": detail,
             "peak_flops": peak, "peak_source": source}, rows)
