"""Soak test: a long run of the tiny demo model, its memory sampled, to show that nothing leaks.

Runs `train.py` (the offline demo, checkpoints and eval included) in a subprocess, samples the
process' resident memory (RSS, from /proc) several times a second together with the last logged
optimizer step, and fits RSS against step after a warm-up. A flat run has a slope near 0 MiB per
100 steps. Prints a table and one JSON line.

    python bench/soak.py                 # 1000 steps
    python bench/soak.py --steps 300 --warmup 100
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y on x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps to run")
    parser.add_argument("--warmup", type=int, default=200, help="steps left out of the fit")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "train.py", "--config", "configs/demo.yaml",
               "--max-steps", str(args.steps), "--logging-steps", "10",
               "--eval-steps", str(max(args.steps // 4, 1)), "--save-steps",
               str(max(args.steps // 4, 1)), "--save-total-limit", "2",
               "--output-dir", os.path.join(tmp, "out")]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        step = [0]

        def follow() -> None:
            for line in proc.stdout:
                if match := re.match(r"step (\d+):", line):
                    step[0] = int(match.group(1))

        threading.Thread(target=follow, daemon=True).start()
        samples, start = [], time.perf_counter()
        while proc.poll() is None:
            if (rss := rss_mib(proc.pid)) is not None:
                samples.append((step[0], rss))
            time.sleep(args.interval)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"train.py failed with exit code {proc.returncode}")

    fitted = [(s, r) for s, r in samples if s >= args.warmup]
    if len(fitted) < 2:
        sys.exit("too few samples after the warm-up: run more --steps")
    per_100 = slope(fitted) * 100
    result = {"steps": args.steps, "seconds": round(seconds, 1), "samples": len(fitted),
              "rss_start_mib": round(fitted[0][1], 1), "rss_end_mib": round(fitted[-1][1], 1),
              "rss_peak_mib": round(max(r for _, r in samples), 1),
              "slope_mib_per_100_steps": round(per_100, 3)}
    print(f"{'steps':<28}{args.steps}\n{'wall seconds':<28}{result['seconds']}")
    for key in ("rss_start_mib", "rss_end_mib", "rss_peak_mib", "slope_mib_per_100_steps"):
        print(f"{key:<28}{result[key]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
