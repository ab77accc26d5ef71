"""The chunked LM head under DeepSpeed ZeRO-3: LM-head module calls and time per step.

Under ZeRO-3 the LM head's weight is sharded, and every call of the head all-gathers it (a
vocabulary × hidden matrix: 311 MB in bf16 for Qwen3-0.6B). This script runs the policy's
forward and backward over `[chosen; rejected]` batches as `dpo_step` does, with responses of
different lengths on each process, and prints per process the LM-head module calls per step
(counted by a forward pre-hook; under ZeRO-3 each call all-gathers the head's weight) and the
median seconds per step.

Launch it with 2 processes (CPU: gloo; `--use_deepspeed` selects the gloo handler in
`dpo.train.runtime`):

    accelerate launch --use_deepspeed --zero_stage 3 --num_processes 2 \\
        bench/zero3_lm_head.py --vocab-size 65536 --hidden-size 512 --chunk-size 128
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dpo.config import TrainConfig  # noqa: E402
from dpo.model.forward import concatenated_forward  # noqa: E402
from dpo.model.logprobs import IGNORE_INDEX  # noqa: E402
from dpo.train.runtime import make_accelerator, make_optimizer  # noqa: E402
from dpo.demo.tiny import tiny_qwen3  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per process and step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    cfg = TrainConfig(batch_size=args.pairs, gradient_accumulation_steps=1,
                      output_dir="/tmp/zero3_lm_head", learning_rate=1e-6)
    accelerator = make_accelerator(cfg)
    model = tiny_qwen3(args.vocab_size, hidden_size=args.hidden_size, num_layers=2, seed=0)
    model, optimizer = accelerator.prepare(model, make_optimizer(cfg, model))
    head = accelerator.unwrap_model(model).get_output_embeddings()
    calls = [0]
    head.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    # Process r answers with responses of length/(r+1): the processes' token counts differ.
    rank, rows = accelerator.process_index, 2 * args.pairs
    generator = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(args.vocab_size, (rows, args.length), generator=generator)
    labels = input_ids.clone()
    prompt = args.length - args.length // (rank + 1) // 2
    labels[:, :prompt] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": labels}
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}

    seconds, head_calls = [], []
    for step in range(args.warmup + args.steps):
        calls[0] = 0
        start = time.perf_counter()
        out = concatenated_forward(model, batch, chunked=True, chunk_size=args.chunk_size)
        loss = -(out.chosen_logps - out.rejected_logps).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
            head_calls.append(calls[0])
    response_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    print(json.dumps({"process": rank, "response_tokens": response_tokens,
                      "chunk_size": args.chunk_size, "lm_head_calls_per_step": head_calls[-1],
                      "median_s_per_step": round(statistics.median(seconds), 4)}), flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
