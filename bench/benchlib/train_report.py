"""The report of `bench_train.py`: its table, and the ratios between implementations against the
issue's targets. Split from it so that `bench_train.py` keeps only the timing harness.
"""
from __future__ import annotations

IMPLS = ("plain", "optimized", "precomputed")
# The targets, printed beside the measured ratios.
TARGET_SPEEDUP = 1.3  # optimized tokens/s over plain
TARGET_PRECOMPUTED = 1.25  # optimized s/step over precomputed s/step
TARGET_MEMORY = 0.6  # optimized peak over plain, at Qwen3's vocabulary
TARGET_UTILISATION_CPU, TARGET_UTILISATION_GPU = 0.60, 0.45

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

