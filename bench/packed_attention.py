"""The model's forward and backward alone, on one batch of natural-ish lengths: padded, packed
on varlen flash attention (CUDA, half precision), and packed one SDPA call per sequence.

Sixteen random-token sequences of 150 to 900 tokens (8 pairs), packed in rows of at most 4096
positions, through `concatenated_forward` (chunked head) and a backward; median-free mean of 5
timed iterations after 2 warm-ups. On CUDA the model is bf16 and a profiler table of the packed
step follows (`--no-profile` skips it). It is where `bench/padding_free.py`'s padding-free
figures on a GPU come from, without the optimizer and the reference.

    python bench/packed_attention.py                # Qwen3-0.6B shape; on a GPU
    python bench/packed_attention.py --tiny         # the demo model's shape, CPU fp32
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from benchlib.common import model_config  # noqa: E402

from dpo.model import packed_attention  # noqa: E402
from dpo.data.batching import PreferenceCollator  # noqa: E402
from dpo.model.forward import concatenated_forward  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", help="the demo model's shape")
parser.add_argument("--no-profile", action="store_true", help="no profiler table (CUDA)")
args = parser.parse_args()
tiny = args.tiny
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
config = model_config("tiny" if tiny else "qwen3-0.6b", None)
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype)
g = torch.Generator().manual_seed(0)
lengths = [(120, 300, 150), (60, 500, 420), (200, 700, 90), (30, 250, 260), (400, 310, 330),
           (80, 180, 900 - 80), (150, 220, 200), (90, 640, 120)]
rows = []
for p, c, r in lengths:
    prompt = torch.randint(config.vocab_size, (p,), generator=g).tolist()
    row = {}
    for side, n in (("chosen", c), ("rejected", r)):
        resp = torch.randint(config.vocab_size, (n,), generator=g).tolist()
        row[f"{side}_input_ids"] = prompt + resp
        row[f"{side}_labels"] = [-100] * p + resp
    rows.append(row)
batches = {name: {k: v.to(device) for k, v in PreferenceCollator(
    0, padding_free=pf, max_packed_tokens=4096)(rows).items()}
    for name, pf in (("padded", False), ("packed", True))}
for name, b in batches.items():
    print(name, {k: tuple(v.shape) for k, v in b.items()})

calls = []
varlen = packed_attention._VARLEN
print("varlen:", varlen, packed_attention._CAUSAL)


def counted(*a, **k):
    calls.append(1)
    return varlen(*a, **k)


def step(batch):
    out = concatenated_forward(model, batch, chunked=True)
    (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    return out


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


results = {}
for name, use_varlen in (("padded", None), ("packed", True), ("packed", False)):
    packed_attention._VARLEN = counted if use_varlen else None
    calls.clear()
    for _ in range(2):
        out = step(batches[name])
    sync()
    t = time.perf_counter()
    n = 2 if tiny else 5
    for _ in range(n):
        out = step(batches[name])
    sync()
    label = f"{name}{'' if use_varlen is None else ('-varlen' if use_varlen else '-loop')}"
    results[label] = out
    print(f"{label}: {(time.perf_counter() - t) / n * 1e3:.1f} ms/fwd+bwd, varlen calls "
          f"{len(calls)}, attn {model.config._attn_implementation}, "
          f"logps {out.chosen_logps[:3].tolist()}", flush=True)
model.config._attn_implementation = "sdpa"

packed_attention._VARLEN = counted
if device == "cuda" and not args.no_profile:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batches["packed"])
        sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                    max_name_column_width=60))
