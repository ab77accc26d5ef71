"""Peak memory of the plain vs chunked log-prob paths, forward + backward, at a given vocab size.

Each path runs in a process of its own (`benchlib.common.run_child`) so that the peak (max RSS
on CPU, max allocated on CUDA) is its own. Prints a table and one JSON line.

    python bench/logprobs_memory.py                        # Qwen3's vocab, 2 pairs x 512 tokens
    python bench/logprobs_memory.py --vocab-size 32000 --seq-len 1024 --pairs 4
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

QWEN3_VOCAB = 151_669


def measure(path: str, args: argparse.Namespace) -> dict:
    """Run one forward + backward of `path` and return its peak memory in MiB."""
    import torch

    from dpo.model.forward import concatenated_forward
    from dpo.demo.tiny import tiny_qwen3

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_qwen3(args.vocab_size, hidden_size=args.hidden_size).to(device)
    rows = 2 * args.pairs
    input_ids = torch.randint(0, args.vocab_size, (rows, args.seq_len), device=device)
    labels = input_ids.clone()
    labels[:, : args.seq_len // 2] = -100  # half prompt, half response, like stack-exchange rows
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": labels}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = concatenated_forward(model, batch, chunked=path == "chunked",
                               chunk_size=args.chunk_size)
    (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # max RSS over the process' life, minus what the model and inputs already took
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"path": path, "device": device, "peak_mib": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=QWEN3_VOCAB)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=2, help="pairs per batch (2x rows)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--path", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.path:  # child process: measure one path
        print(json.dumps(measure(args.path, args)))
        return
    from benchlib.common import run_child

    results = {}
    for path in ("plain", "chunked"):
        child = run_child(__file__, [*sys.argv[1:], "--path", path])
        if child.returncode:
            sys.exit(f"{path} failed:\n{child.stderr[-3000:]}")
        results[path] = json.loads(child.stdout.strip().splitlines()[-1])
    ratio = results["chunked"]["peak_mib"] / max(results["plain"]["peak_mib"], 1e-9)
    print(f"vocab {args.vocab_size}, {args.pairs} pairs x {args.seq_len} tokens, "
          f"device {results['plain']['device']} (forward + backward, peak above the model)")
    print(f"{'path':<10}{'peak MiB':>12}")
    for path, r in results.items():
        print(f"{path:<10}{r['peak_mib']:>12.1f}")
    print(f"chunked / plain: {ratio:.3f}")
    print(json.dumps({"vocab_size": args.vocab_size, "seq_len": args.seq_len,
                      "pairs": args.pairs, **{f"{p}_peak_mib": r["peak_mib"]
                                              for p, r in results.items()},
                      "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
