"""Peak memory of one no-grad reference forward on the chunked path: the last hidden state taken
by a hook (`concatenated_forward` now) vs every layer's hidden states (`output_hidden_states`).

Each variant runs in a fresh subprocess on a random model of SmolLM2-135M's shape (30 layers).
The peak above the loaded model and inputs: on CUDA max allocated; on CPU the kernel's RSS
high-water mark (VmHWM), reset just before the forward, with glibc told to map every large block
on its own (`MALLOC_MMAP_THRESHOLD_`) so that RSS follows the live tensors instead of what the
heap keeps after a free. Prints a table and one JSON line.

    python bench/reference_forward_memory.py                  # 2 pairs x 512 tokens
    python bench/reference_forward_memory.py --pairs 4 --seq-len 1024
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

VARIANTS = ("all_layers", "last_only")


def smollm2_135m_shape(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       max_position_embeddings=2048, tie_word_embeddings=True)


def _rss_mib(field: str) -> float:
    kib = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)
    return int(kib) / 1024


def measure(variant: str, args: argparse.Namespace) -> dict:
    """One no-grad chunked forward of `variant`; its peak memory above what was live before."""
    import torch
    from accelerate.utils import extract_model_from_parallel
    from transformers import AutoModelForCausalLM

    from dpo.model.forward import causal_attention_mask, concatenated_forward
    from dpo.model.logprobs import chunked_sequence_logps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_135m_shape(args.vocab_size))
    model = model.to(device).eval().requires_grad_(False)
    rows = 2 * args.pairs
    input_ids = torch.randint(0, args.vocab_size, (rows, args.seq_len), device=device)
    labels = input_ids.clone()
    labels[:, : args.seq_len // 2] = -100  # half prompt, half response
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": labels}

    def all_layers():  # the chunked path before: every layer's output returned to the caller
        out = model(input_ids=input_ids, attention_mask=causal_attention_mask(
            batch["attention_mask"]), output_hidden_states=True, logits_to_keep=1,
            use_cache=False)
        lm_head = extract_model_from_parallel(model).get_output_embeddings()
        return chunked_sequence_logps(out.hidden_states[-1], lm_head, labels,
                                      chunk_size=args.chunk_size)[0]

    def last_only():
        return concatenated_forward(model, batch, chunked=True,
                                    chunk_size=args.chunk_size).chosen_logps

    forward = {"all_layers": all_layers, "last_only": last_only}[variant]
    with torch.no_grad():
        forward()  # warm-up: lazy initialisation and allocator caches are not the forward's
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            base = _rss_mib("VmRSS")
        forward()
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = _rss_mib("VmHWM")
    return {"variant": variant, "device": device, "peak_mib": round(peak - base, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=49_152)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=2, help="pairs per batch (2x rows)")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # child process: measure one variant
        print(json.dumps(measure(args.variant, args)))
        return
    results = {}
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                               check=True, capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parents[1],
                               env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)})
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"SmolLM2-135M shape (30 layers), {2 * args.pairs} rows x {args.seq_len} tokens, "
          f"device {results['last_only']['device']}: no-grad chunked forward, peak above the "
          "model and inputs")
    print(f"{'hidden states':<16}{'peak MiB':>10}")
    for variant, r in results.items():
        print(f"{variant:<16}{r['peak_mib']:>10.1f}")
    print(json.dumps({"seq_len": args.seq_len, "rows": 2 * args.pairs,
                      **{f"{v}_peak_mib": r["peak_mib"] for v, r in results.items()}}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
