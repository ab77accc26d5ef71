"""What the benches share: the published model shapes (random weights, nothing downloaded),
synthetic or demo preference pairs, the FLOP count and the device's matmul rate, peak memory,
and the gradient-checkpointing mixes.

Split from `bench_train.py` so that it keeps only the timing harness (run the steps, time them,
report), and so that `lora.py`, `padding_free.py` and `packed_attention.py` build the same shapes
and measure memory the same way without importing the harness.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import resource
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

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
    """Useful model FLOPs of a batch (see `bench_train.py`'s docstring)."""

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


def train_micro_batch(accelerator, cfg, policy, reference, optimizer, batch):
    """One micro-batch as train.py runs it, inside `accelerator.accumulate`: the DPO step,
    backward, clipping where the optimizer step ends, AdamW (a no-op between those ends). The
    mean loss, a device scalar: no host sync."""
    from dpo.train.step import dpo_step

    with accelerator.accumulate(policy):
        loss = dpo_step(accelerator, cfg, policy, reference, batch).losses.mean()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return loss


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


# What every bench child imports: a forked child finds them imported already.
PRELOAD = ("torch", "datasets", "accelerate", "transformers.modeling_utils")


def run_child(script: str, argv: list[str], env: dict | None = None,
              ) -> subprocess.CompletedProcess:
    """`python <script> <argv>` in a process of its own, so that its peak memory is its own,
    reported as `subprocess.run(..., capture_output=True, text=True)` reports it.

    Forked from this process, which imports `PRELOAD` first, the child running the script as
    `__main__` (`runpy`, with `sys.argv` and `env` set): it skips the seconds a fresh
    interpreter spends importing torch and transformers, and its peak RSS counts the same
    libraries a fresh one would load. A fresh interpreter where this process has initialised
    CUDA (a forked CUDA context is unusable) or cannot fork."""
    import torch

    script = str(script)
    if not hasattr(os, "fork") or torch.cuda.is_initialized():
        return subprocess.run([sys.executable, script, *argv], cwd=Path(script).parents[1],
                              env=env, capture_output=True, text=True)
    for name in PRELOAD:
        importlib.import_module(name)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                if env is not None:
                    os.environ.clear()
                    os.environ.update(env)
                sys.argv = [script, *argv]
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 -- reported as a fresh interpreter would
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess([script, *argv], code, out.read(), err.read())


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



def compute_dtype(args, device):
    """The dtype the step's matmuls run in: bf16 under bf16 autocast, else fp32."""
    import torch

    return torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32


def enable_checkpointing(model, mode: str) -> None:
    """Recompute in the backward: every decoder layer (full), every other one (alternate), or
    only each layer's MLP block (mlp)."""
    import functools

    from torch.utils.checkpoint import checkpoint

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = model.model.layers
    if mode == "alternate":
        for layer in layers[1::2]:
            layer.gradient_checkpointing = False
    elif mode == "mlp":
        for layer in layers:
            layer.gradient_checkpointing = False
            mlp = layer.mlp
            mlp.forward = functools.partial(checkpoint, mlp.forward, use_reentrant=False)
