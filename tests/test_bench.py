"""The benchmark scripts stay runnable: each answers --help, and the training benchmark measures
one tiny step of every implementation. (They print timings; nothing here asserts one.)"""
import json

import pytest

from tests.conftest import LLAMA3_1_TOKENIZER, ROOT, SHARED_DATA, require_shared
from tests.e2e import demo_env, run_python

SCRIPTS = sorted((ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_answers_help(script, tmp_path):
    out = run_python([str(script), "--help"], demo_env(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:")


@pytest.mark.slow
def test_bench_train_compares_the_three_implementations(tmp_path):
    out = run_python(
        ["bench/bench_train.py", "--compare", "--steps", "1", "--warmup", "1",
         "--max-length", "48", "--matmul-size", "256"],
        demo_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    runs = {run["impl"]: run for run in summary["runs"]}
    assert set(runs) == {"plain", "optimized", "precomputed"}
    # The same pairs, so the same real tokens; only the reference's forward FLOPs differ.
    assert runs["plain"]["model_gflop_per_step"] == runs["optimized"]["model_gflop_per_step"]
    assert runs["precomputed"]["model_gflop_per_step"] < runs["optimized"]["model_gflop_per_step"]
    assert runs["precomputed"]["precompute_s"] is not None
    assert 0 < runs["optimized"]["flop_utilisation"] < 1
    assert "speedup_tokens_per_s_vs_plain" in summary and "FLOP utilisation" in out.stdout


@pytest.mark.slow
def test_padding_free_bench_runs_the_same_steps_packed(tmp_path):
    """bench/padding_free.py on the tiny shape: padded and packed steps on the same HH pairs give
    the same losses (the same pairs, the same numbers), packing leaves no padding, and each
    checkpointing mix trains to the same losses too."""
    require_shared(SHARED_DATA / "hh_rlhf_helpful_base_test.jsonl.gz")
    require_shared(LLAMA3_1_TOKENIZER)
    out = run_python(
        ["bench/padding_free.py", "--shape", "tiny", "--steps", "2", "--warmup",
         "0", "--batch-size", "2", "--variants", "padded,padding-free,ckpt-mlp,ckpt-alternate"],
        demo_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    runs = {run["variant"]: run for run in summary["runs"]}
    assert runs["padded"]["padding_fraction"] > 0 == runs["padding-free"]["padding_fraction"]
    for name in ("padding-free", "ckpt-mlp", "ckpt-alternate"):
        assert runs[name]["losses"] == pytest.approx(runs["padded"]["losses"], rel=1e-5)
    assert {"ideal_gain", "measured_gain", "ckpt-mlp"} <= summary.keys()


@pytest.mark.slow
def test_lora_bench_measures_full_and_lora(tmp_path):
    """bench/lora.py on the demo's tiny shape: a row for full fine-tuning and one for LoRA, LoRA
    training a small share of the parameters, both at loss ln 2 after their one step (the
    step's loss is taken before its update, and the policy starts as the reference)."""
    out = run_python(
        ["bench/lora.py", "--shapes", "tiny", "--modes", "full,lora", "--lora-r", "4",
         "--steps", "1", "--warmup", "0"],
        demo_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [row["mode"] for row in rows] == ["full", "lora r=4"]
    full, lora = rows
    assert lora["trainable_m"] < 0.1 * full["trainable_m"]
    for row in rows:
        assert row["loss_last"] == pytest.approx(0.693147, abs=1e-4)


@pytest.mark.slow
def test_shared_prompt_bench_trains_the_same_pairs_on_fewer_tokens(tmp_path):
    """bench/shared_prompt.py on the tiny shape and the stack-exchange rows: separate sequences
    and shared prompts (packed, the default) train the same pairs to the same losses, the
    shared layout computing fewer tokens by the prompts it no longer repeats."""
    require_shared(SHARED_DATA / "stack_exchange_paired_tiny.json")
    require_shared(LLAMA3_1_TOKENIZER)
    out = run_python(
        ["bench/shared_prompt.py", "--shape", "tiny", "--steps", "2", "--warmup", "0",
         "--batch-size", "2", "--max-length", "256", "--datasets", "stack-exchange",
         "--layouts", "separate,shared-packed"],
        demo_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    runs = {run["layout"]: run for run in summary["runs"]}
    assert runs["separate"]["tokens_saved"] == 0
    for layout in ("shared-packed",):
        assert runs[layout]["losses"] == pytest.approx(runs["separate"]["losses"], rel=1e-5)
        assert runs[layout]["tokens_saved"] > 0.1
        gain = summary[f"stack-exchange/{layout}"]
        assert gain["ideal_gain"] == pytest.approx(1 / (1 - runs[layout]["tokens_saved"]),
                                                   rel=1e-2)


@pytest.mark.slow
def test_gpu_acceptance_runs_its_cpu_parts(tmp_path):
    """bench/gpu_acceptance.py on CPU: every part that runs here is ok, 4bit says it needs
    CUDA, and the throughput table has the three layouts on the tiny shape, a shared prompt
    computed once (fewer tokens than packed, the same pairs)."""
    out = run_python(
        ["bench/gpu_acceptance.py", "--shape", "tiny", "--steps", "1", "--warmup", "0",
         "--pairs-per-step", "4", "--micro-batch", "2", "--max-length", "64"],
        demo_env(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    parts = {row["part"]: row for row in report["parts"]}
    assert list(parts) == ["bf16", "fp16", "layouts", "lora", "4bit", "zero2", "zero3",
                           "throughput"]
    for name in ("bf16", "fp16", "layouts", "lora", "zero2", "zero3", "throughput"):
        assert parts[name]["status"] == "ok", parts[name]
    assert parts["4bit"]["status"] == "skip" and parts["4bit"]["detail"] == "needs CUDA"
    rows = {row["layout"]: row for row in report["throughput"]}
    assert list(rows) == ["padded", "packed", "shared-packed"]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] > 0 for row in rows.values())
    assert rows["shared-packed"]["tokens_per_step"] < rows["packed"]["tokens_per_step"]
    assert rows["packed"]["tokens_per_step"] == rows["padded"]["tokens_per_step"]
    assert report["device"] == "cpu" and report["torch"] and report["date"]
