"""Time from SIGTERM to a saved checkpoint and to process exit, on the offline demo.

Starts `train.py --config configs/demo.yaml`, sends SIGTERM once a given step has been logged,
and reads the run's own report ("SIGTERM: saved checkpoint-N in X.Xs") beside the wall time until
the process exited. Prints one line per trial and a JSON summary.

    python bench/sigterm_exit.py                 # 3 trials, signal after step 50
    python bench/sigterm_exit.py --trials 5 --after-step 100
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trial(after_step: int, output_dir: Path) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/demo.yaml", "--logging-steps", "1",
         "--output-dir", str(output_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, sent = [], None
    for line in proc.stdout:
        log.append(line)
        if sent is None and f"step {after_step}:" in line:
            proc.send_signal(signal.SIGTERM)
            sent = time.perf_counter()
    proc.wait()
    exited = time.perf_counter()
    if sent is None:
        sys.exit(f"error: the run ended before step {after_step} (exit {proc.returncode})")
    saved = re.search(r"SIGTERM: saved checkpoint-(\d+) in ([\d.]+)s", "".join(log))
    if proc.returncode != 0 or saved is None:
        sys.exit(f"error: exit {proc.returncode}, no checkpoint report:\n{''.join(log)[-2000:]}")
    return {"exit_code": proc.returncode, "checkpoint_step": int(saved.group(1)),
            "signal_to_saved_s": float(saved.group(2)),
            "signal_to_exit_s": round(exited - sent, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--after-step", type=int, default=50, help="signal once it is logged")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="sigterm_") as tmp:
        for i in range(args.trials):
            result = trial(args.after_step, Path(tmp) / f"run{i}")
            print(f"trial {i}: exit {result['exit_code']}, checkpoint-{result['checkpoint_step']}"
                  f" saved {result['signal_to_saved_s']:.1f} s and process gone "
                  f"{result['signal_to_exit_s']:.2f} s after the signal", flush=True)
            results.append(result)
    exits = [r["signal_to_exit_s"] for r in results]
    print(json.dumps({"trials": len(results), "median_signal_to_exit_s": statistics.median(exits),
                      "max_signal_to_exit_s": max(exits),
                      "max_signal_to_saved_s": max(r["signal_to_saved_s"] for r in results)}))


if __name__ == "__main__":
    main()
