"""Drawing 1000 rows from a large local folder: streamed (seeded shuffle over shards, a buffer,
stop after the rows drawn) vs loaded in full (`datasets` reads every shard into its Arrow cache).

Generates a folder of parquet shards with the columns of lvwerra/stack-exchange-paired
(`question`, `response_j`, `response_k`, short random texts) into a temp dir (or --dir, reused if
it is there), then runs `load_preference_splits(folder, num_samples=N)` in a fresh subprocess per
mode, each with an empty `datasets` cache, and reports the child's seconds (the call only, not
the imports), peak RSS (ru_maxrss) and bytes read (/proc/self/io: `rchar`, every byte read by a
read syscall, page cache or not; `read_bytes`, what came from the disk; `wchar`, bytes written,
i.e. the Arrow cache). Prints a table and one JSON line.

A streamed parquet draw ends with a fixed 5 s pause: `datasets` sleeps
`config.SLEEP_TIME_ON_THREADS_SHUTDOWN` when a parquet stream closes (apache/arrow#45214).

    python bench/streaming_draw.py                          # 40 shards x 25,000 rows = 1M rows
    python bench/streaming_draw.py --shards 80 --rows-per-shard 25000 --dir /tmp/big
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
from dpo.data.sources import load_preference_splits
def io():
    return {k: int(v) for k, v in (l.split(': ') for l in open('/proc/self/io'))}
folder, n, streaming, buffer = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1', int(sys.argv[4])
before, start = io(), time.perf_counter()
train, eval_ = load_preference_splits(folder, num_samples=n, eval_samples=0, seed=0,
                                      streaming=streaming, shuffle_buffer_size=buffer)
seconds, after = time.perf_counter() - start, io()
print(json.dumps({"seconds": round(seconds, 2), "rows": len(train),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "rchar_mib": round((after['rchar'] - before['rchar']) / 2**20, 1),
                  "read_bytes_mib": round((after['read_bytes'] - before['read_bytes']) / 2**20, 1),
                  "wchar_mib": round((after['wchar'] - before['wchar']) / 2**20, 1),
                  "first_rows": train['row_index'][:3]}))
"""


def generate(folder: Path, shards: int, rows_per_shard: int) -> int:
    """Write the shards (skipped if the folder already holds them); return the bytes on disk."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(5000)])

    def texts(words: int) -> pa.Array:
        picks = vocab[rng.integers(0, len(vocab), (rows_per_shard, words))]
        return pa.array([" ".join(row) for row in picks])

    for shard in range(shards):
        path = folder / f"train-{shard:05d}-of-{shards:05d}.parquet"
        if not path.exists():
            pq.write_table(pa.table({"question": texts(12), "response_j": texts(24),
                                     "response_k": texts(24)}), path)
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def measure(folder: Path, args: argparse.Namespace, streaming: bool) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {"HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PATH": "/usr/bin:/bin", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(args.num_samples),
                              "1" if streaming else "0", str(args.buffer)], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
    return {"mode": "streamed" if streaming else "loaded in full",
            **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="folder for the shards (default: a temp dir, deleted)")
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--rows-per-shard", type=int, default=25_000)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--buffer", type=int, default=10_000, help="shuffle_buffer_size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir) if args.dir else Path(tmp) / "shards"
        start = time.perf_counter()
        size = generate(folder, args.shards, args.rows_per_shard)
        print(f"{args.shards} shards x {args.rows_per_shard:,} rows, {size / 2**20:.0f} MiB of "
              f"parquet (generated in {time.perf_counter() - start:.0f} s)")
        runs = [measure(folder, args, streaming) for streaming in (True, False)]
    print(f"{'mode':<16}{'rows':>6}{'seconds':>9}{'peak RSS MiB':>14}{'rchar MiB':>11}"
          f"{'disk MiB':>10}{'written MiB':>13}")
    for r in runs:
        print(f"{r['mode']:<16}{r['rows']:>6}{r['seconds']:>9}{r['peak_rss_mib']:>14}"
              f"{r['rchar_mib']:>11}{r['read_bytes_mib']:>10}{r['wchar_mib']:>13}")
    print(json.dumps({"shards": args.shards, "rows": args.shards * args.rows_per_shard,
                      "parquet_mib": round(size / 2**20), "num_samples": args.num_samples,
                      "shuffle_buffer_size": args.buffer, "runs": runs}))


if __name__ == "__main__":
    main()
