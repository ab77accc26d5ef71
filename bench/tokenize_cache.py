"""Tokenizing N preference pairs with the real Qwen3 tokenizer: the first run (tokenize and save
the cache entry) vs a second run (load it), and what computing the cache key costs.

Synthetic rows (prompt/chosen/rejected strings) are normalised in memory as `load_preference_
splits` leaves them, then passed twice to `dpo.data.cache.tokenize_cached` with a fresh cache
folder, in one process (the second call is what a later run, a resume or every process after the
first does). Prints a table and one JSON line.

    python bench/tokenize_cache.py                        # 100k rows
    python bench/tokenize_cache.py --rows 10000 --num-proc 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DPO_SHARED") or ROOT.parent / "shared")
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "qwen3"


def synthetic_rows(count: int) -> list[dict]:
    """Rows of a few dozen to a few hundred tokens, every one distinct."""
    return [{
        "prompt": f"Question {i}: how do I sort a list of {i % 97} records by their second field "
                  "in Python, keeping equal keys in their original order?" * (1 + i % 3),
        "chosen": f"Use sorted(records, key=lambda r: r[1]); Python's sort is stable, so records "
                  f"with equal keys keep their order. For {i} records that is O(n log n)."
                  * (1 + i % 2),
        "rejected": f"Write a bubble sort by hand for the {i} records.",
    } for i in range(count)]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    args = parser.parse_args()
    if not Path(args.tokenizer).exists():
        print(f"skipped: tokenizer {args.tokenizer} not found (../shared ships with CI)")
        return

    sys.path.insert(0, str(ROOT))  # this checkout's dpo, not an installed one
    from datasets import Dataset
    from transformers import AutoTokenizer

    from dpo.data import prepare_tokenizer
    from dpo.data.cache import cache_key, rows_digest, tokenize_cached, tokenizer_digest
    from dpo.data.formats import normalise

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
    rows = normalise(Dataset.from_list(synthetic_rows(args.rows)), num_proc=args.num_proc)
    settings = dict(max_length=args.max_length, num_proc=args.num_proc)
    _, rows_s = timed(lambda: rows_digest(rows))
    _, tokenizer_s = timed(lambda: tokenizer_digest(tokenizer))
    _, key_s = timed(lambda: cache_key(rows, tokenizer, settings))
    with tempfile.TemporaryDirectory() as cache_dir:
        (first, report), first_s = timed(lambda: tokenize_cached(rows, tokenizer,
                                                                 cache_dir=cache_dir, **settings))
        (second, _), second_s = timed(lambda: tokenize_cached(rows, tokenizer,
                                                              cache_dir=cache_dir, **settings))
        assert first["chosen_input_ids"][:100] == second["chosen_input_ids"][:100]
        size = sum(f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file())

    result = {"rows": args.rows, "kept": report.kept, "num_proc": args.num_proc,
              "first_run_s": round(first_s, 2), "second_run_s": round(second_s, 2),
              "speedup": round(first_s / second_s, 1), "key_s": round(key_s, 3),
              "rows_digest_s": round(rows_s, 3), "tokenizer_digest_s": round(tokenizer_s, 3),
              "cache_mib": round(size / 2**20, 1), "cpus": os.cpu_count()}
    print(f"{'run':<28}{'seconds':>10}", file=sys.stderr)
    for name, value in (("first (tokenize + save)", first_s), ("second (load from cache)",
                        second_s), ("cache key (all of it)", key_s),
                        ("  rows digest", rows_s), ("  tokenizer digest", tokenizer_s)):
        print(f"{name:<28}{value:>10.3f}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
