"""End-to-end: `train.py` in a subprocess on the offline demo model and data (tiny, CPU, fp32)."""
import json
import shutil

import pytest

from dpo.train.metrics import PAIR_KEYS
from tests.conftest import SHARED_DATA, require_shared
from tests.e2e import (assert_same_logs, demo_env, read_metrics, run_train, train_logs,
                       weights_equal)

pytestmark = pytest.mark.slow

TRAIN_KEYS = {"step", *PAIR_KEYS, "grad_norm", "lr", "tokens_per_sec", "epoch"}
# A short run of the demo: 2 pairs x 2 accumulation steps per optimizer step.
SMALL = ["--model", "builtin:tiny-qwen3", "--dataset", "builtin:demo-preferences",
         "--num-samples", "64", "--eval-samples", "8", "--max-length", "64", "--batch-size", "2",
         "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--logging-steps", "1",
         "--num-sample-generations", "1", "--max-new-tokens", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment with a private demo cache, built once for the module."""
    return demo_env(tmp_path_factory.mktemp("dpo_cache"))


def run(env, *flags, check=True):
    return run_train(env, *flags, check=check)


@pytest.fixture(scope="module")
def four_steps(env, tmp_path_factory):
    """4 optimizer steps, checkpoints at 2 and 4, an eval at step 2 and at the end."""
    out = tmp_path_factory.mktemp("run") / "out"
    run(env, *SMALL, "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2",
        "--output-dir", str(out))
    return out


def test_outputs(four_steps):
    """Every metric key is logged each step; the model, tokenizer, config and eval results are
    written where a user (and `from_pretrained`) expects them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logs = read_metrics(four_steps)
    train = train_logs(four_steps)
    assert [log["step"] for log in train] == [1, 2, 3, 4]
    for log in train:
        assert TRAIN_KEYS <= set(log), TRAIN_KEYS - set(log)
    eval_logs = [log for log in logs if "eval/loss" in log]
    assert [log["step"] for log in eval_logs] == [2, 4]
    assert set(eval_logs[-1]) == {"step", *(f"eval/{k}" for k in PAIR_KEYS)}
    # The first step starts from policy = reference: loss ln 2 before any update.
    assert train[0]["loss"] == pytest.approx(0.6931, abs=2e-3)

    results = json.loads((four_steps / "eval_results.json").read_text())
    assert results == {k: v for k, v in eval_logs[-1].items() if k != "step"}
    assert (four_steps / "model.safetensors").is_file()
    assert (four_steps / "training_config.yaml").is_file()
    assert json.loads((four_steps / "config.json").read_text())["model_type"] == "qwen3"
    model = AutoModelForCausalLM.from_pretrained(four_steps)
    tokenizer = AutoTokenizer.from_pretrained(four_steps)
    assert model.config.vocab_size == len(tokenizer)
    samples = [json.loads(line) for line in (four_steps / "samples.jsonl").read_text().split("\n")
               if line]
    assert {"prompt", "policy", "reference"} <= set(samples[0])
    assert sorted(p.name for p in four_steps.glob("checkpoint-*")) == ["checkpoint-2",
                                                                       "checkpoint-4"]


def test_resume_continues_exactly(env, four_steps, tmp_path):
    """Drop everything after step 2, resume from `latest`: the run continues at step 3 and ends
    with bit-identical weights and the same metrics, each step logged once."""
    out = tmp_path / "out"
    shutil.copytree(four_steps, out)
    shutil.rmtree(out / "checkpoint-4")
    (out / "model.safetensors").unlink()
    result = run(env, *SMALL, "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2",
                 "--output-dir", str(out), "--resume-from-checkpoint", "latest")
    assert "step 3" in result.stdout + result.stderr
    assert weights_equal(out, four_steps)
    assert [log["step"] for log in train_logs(out)] == [1, 2, 3, 4]
    assert_same_logs(read_metrics(out), read_metrics(four_steps), rel=1e-6)


def test_non_empty_output_dir_is_refused(env, four_steps):
    result = run(env, *SMALL, "--max-steps", "1", "--output-dir", str(four_steps), check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if "not empty" in line]


def test_latest_without_checkpoint_is_a_clear_error(env, tmp_path):
    result = run(env, *SMALL, "--output-dir", str(tmp_path / "fresh"),
                 "--resume-from-checkpoint", "latest", check=False)
    assert result.returncode != 0
    assert "no complete checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_save_total_limit_and_overwrite(env, four_steps, tmp_path):
    """`--overwrite-output-dir` replaces an old run; only the newest checkpoint is kept."""
    out = tmp_path / "out"
    shutil.copytree(four_steps, out)
    run(env, *SMALL, "--max-steps", "3", "--save-steps", "1", "--save-total-limit", "1",
        "--output-dir", str(out), "--overwrite-output-dir", "--eval-samples", "0")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (out / "eval_results.json").exists() or json.loads(
        (out / "eval_results.json").read_text()) == {}
    assert [log["step"] for log in read_metrics(out)] == [1, 2, 3]


def test_wpo_weighting_end_to_end(env, tmp_path):
    """`--use-weighting`: the pairs' weights are logged as `weights/mean` (train and eval), in
    (0, 1]; step 1 starts at policy = reference, where every pair's loss is ln 2 times its
    weight, so the logged loss is ln 2 times the logged mean weight."""
    import math

    out = tmp_path / "out"
    run(env, *SMALL, "--max-steps", "2", "--eval-steps", "2", "--use-weighting",
        "--output-dir", str(out))
    train = train_logs(out)
    assert all(0 < log["weights/mean"] <= 1 for log in train)
    assert train[0]["loss"] == pytest.approx(math.log(2) * train[0]["weights/mean"], rel=1e-5)
    assert 0 < json.loads((out / "eval_results.json").read_text())["eval/weights/mean"] <= 1


def test_ld_dpo_end_to_end_with_a_precomputed_reference(env, tmp_path):
    """`--ld-alpha 0.5 --precompute-ref-logps`: the precomputed reference is desensitised like
    the policy, so step 1 (policy = reference) has loss ln 2 and rewards 0 (to the rounding of
    the pass's other batches of shared-prompt rows: ~1e-7, where a reference that was not
    desensitised would be off by whole nats); then it trains (rewards move)."""
    import math

    out = tmp_path / "out"
    run(env, *SMALL, "--max-steps", "3", "--ld-alpha", "0.5", "--precompute-ref-logps",
        "--output-dir", str(out))
    train = train_logs(out)
    assert train[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert train[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert abs(train[-1]["rewards/margins"]) > 1e-3
    assert "weights/mean" not in train[0]


@pytest.fixture(scope="module")
def qwen3_tiny(tmp_path_factory):
    """A tiny Qwen3 with the real Qwen3 tokenizer (from ../shared), saved once for the module."""
    from dpo.demo.tiny import tiny_qwen3
    from tests.conftest import QWEN3_TOKENIZER, load_shared_tokenizer

    tokenizer = load_shared_tokenizer(QWEN3_TOKENIZER)
    model = tmp_path_factory.mktemp("qwen3_tiny") / "model"
    tiny_qwen3(len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    return model


HH_HELPFUL = SHARED_DATA / "hh_rlhf_helpful_base_test.jsonl.gz"


@pytest.mark.shared
def test_orpo_end_to_end_without_a_reference(env, qwen3_tiny, tmp_path):
    """`--loss-type orpo` on real HH-RLHF pairs loads no reference model (none is placed, the
    sample answers have no reference's), logs the log odds (train and eval), and its loss, the
    chosen responses' NLL plus λ·the odds-ratio term, is finite and falls at every step."""
    import math

    out = tmp_path / "out"
    result = run(env, "--model", str(qwen3_tiny), "--dataset", str(require_shared(HH_HELPFUL)),
                 "--num-samples", "20", "--eval-samples", "4", "--max-length", "256",
                 "--batch-size", "2", "--gradient-accumulation-steps", "2", "--logging-steps",
                 "1", "--num-sample-generations", "1", "--max-new-tokens", "4", "--seed", "3",
                 "--max-steps", "4", "--eval-steps", "4", "--loss-type", "orpo",
                 "--learning-rate", "1e-2", "--output-dir", str(out))
    assert "reference:" not in result.stdout + result.stderr
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all("reference" not in sample for sample in samples)
    train = train_logs(out)
    losses = [log["loss"] for log in train]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert all({"log_odds_chosen", "log_odds_ratio"} <= set(log) for log in train)
    results = json.loads((out / "eval_results.json").read_text())
    assert math.isfinite(results["eval/log_odds_chosen"]) and results["eval/loss"] < losses[0]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_thinking_and_tool_call_datasets_train_end_to_end(env, tmp_path):
    """A tiny Qwen3 with the real Qwen3 tokenizer trains on a thinking dataset (reasoning as a
    field and inline) and a tool-call dataset (tools per row, calls as responses, tool results
    in prompts), mixed, with thinking on: every pair kept, both evaluated."""
    from dpo.demo.tiny import tiny_qwen3
    from tests.conftest import QWEN3_TOKENIZER, load_shared_tokenizer

    tokenizer = load_shared_tokenizer(QWEN3_TOKENIZER)
    model = tmp_path / "model"
    tiny_qwen3(len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    thinking = _write_jsonl(tmp_path / "thinking.jsonl", [{
        "prompt": [{"role": "user", "content": f"What is {a}+{a + 1}?"}],
        "chosen": [{"role": "assistant", "content": str(2 * a + 1),
                    "reasoning_content": f"{a} and {a + 1} make {2 * a + 1}."}
                   if a % 2 else {"role": "assistant", "content": f"<think>\n{a}+{a + 1}\n"
                                                                 f"</think>\n\n{2 * a + 1}"}],
        "rejected": [{"role": "assistant", "content": str(2 * a)}]} for a in range(10)])
    tool = {"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}}, "required": ["city"]}}}
    cities = ["Paris", "Rome", "Oslo", "Lima", "Pune", "Kyiv", "Baku", "Doha", "Riga", "Bern"]
    calls = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": city}}}]} for city in cities]
    tools = _write_jsonl(tmp_path / "tools.jsonl", [{
        "prompt": [{"role": "user", "content": f"Weather in {city}?"},
                   *([call, {"role": "tool", "content": "18C"}] if i % 2 else [])],
        "chosen": [{"role": "assistant", "content": "It is 18C."} if i % 2 else call],
        "rejected": [{"role": "assistant", "content": "I cannot know."}],
        "tools": [tool]} for i, (city, call) in enumerate(zip(cities, calls))])
    out = tmp_path / "out"
    result = run(env, "--model", str(model), "--dataset", str(thinking), str(tools),
                 "--num-samples", "16", "--eval-samples", "4", "--max-length", "256",
                 "--batch-size", "2", "--gradient-accumulation-steps", "1", "--max-steps", "3",
                 "--learning-rate", "1e-3", "--logging-steps", "1", "--eval-steps", "3",
                 "--num-sample-generations", "0", "--chat-template-kwargs",
                 '{"enable_thinking": true}', "--output-dir", str(out))
    for name in ("thinking", "tools"):
        assert f"train pairs ({name}): kept 6 of 6 pairs (0 truncated), dropped none" \
            in result.stdout
    train = train_logs(out)
    assert [log["step"] for log in train] == [1, 2, 3]
    assert all(log["grad_norm"] > 0 for log in train)
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval/thinking/loss", "eval/tools/loss"} <= set(results)


@pytest.mark.shared
def test_kto_trains_on_hh_rlhf_pairs_made_unpaired_and_on_unpaired_rows(env, qwen3_tiny,
                                                                        tmp_path):
    """KTO end to end on real HH-RLHF rows: the helpful pairs made unpaired (each pair a
    desirable and an undesirable completion) mixed with an unpaired file of harmless rows
    (prompt, completion, label), a tiny Qwen3 with the real Qwen3 tokenizer. Step 1 starts at
    π = π_ref: z₀ = 0 and every row's loss 1/2; the class metrics are logged for training and
    each dataset's eval; a dataset with one class only, and unpaired rows under a pair loss, stop
    with one line."""
    import gzip

    from dpo.train.metrics import UNPAIRED_KEYS

    helpful = require_shared(HH_HELPFUL)
    with gzip.open(require_shared(SHARED_DATA / "hh_rlhf_harmless_base_test.jsonl.gz"), "rt") as f:
        pairs = [json.loads(next(f)) for _ in range(12)]
    rows = []
    for i, pair in enumerate(pairs):
        text = pair["chosen" if i % 2 == 0 else "rejected"]
        cut = text.rindex("\n\nAssistant:")
        rows.append({"prompt": text[:cut], "label": i % 2 == 0,
                     "completion": text[cut + len("\n\nAssistant:"):].strip()})
    harmless = _write_jsonl(tmp_path / "harmless.jsonl", rows)
    common = ["--model", str(qwen3_tiny), "--loss-type", "kto", "--max-length", "256",
              "--batch-size", "4", "--gradient-accumulation-steps", "1", "--learning-rate",
              "1e-3", "--logging-steps", "1", "--num-sample-generations", "0", "--seed", "5"]
    out = tmp_path / "out"
    result = run(env, *common, "--dataset", str(helpful), str(harmless), "--num-samples", "16",
                 "--eval-samples", "4", "--dataset-num-samples", "6", "10", "--max-steps", "3",
                 "--eval-steps", "3", "--undesirable-weight", "1.2", "--output-dir", str(out))
    assert "train pairs (harmless): kept 8 of 8 pairs" in result.stdout  # 10 rows, 2 held out
    train = train_logs(out)
    assert [log["step"] for log in train] == [1, 2, 3]
    assert set(UNPAIRED_KEYS) | {"rewards/margins"} <= set(train[0])
    assert train[0]["kl"] == 0.0 and 0.5 <= train[0]["loss"] <= 0.6  # ½ and ½·1.2 per row
    assert train[-1]["kl"] > 0
    results = json.loads((out / "eval_results.json").read_text())
    for name in ("hh_rlhf_helpful_base_test", "harmless"):
        assert {f"eval/{name}/kl", f"eval/{name}/rewards/chosen"} <= set(results), results
    assert "- Loss: kto, β = 0.1, undesirable_weight = 1.2" in (out / "README.md").read_text()

    one_class = _write_jsonl(tmp_path / "good.jsonl", [{**row, "label": True} for row in rows])
    small = ["--num-samples", "12", "--eval-samples", "2"]
    bad = run(env, *common, *small, "--dataset", str(one_class), "--output-dir",
              str(tmp_path / "b"), check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1] == (
        f"error: dataset {one_class}: all 10 rows are desirable (label True): KTO needs "
        "desirable and undesirable completions to learn what to move towards and away from")
    bad = run(env, *common[:2], *small, "--dataset", str(harmless), "--output-dir",
              str(tmp_path / "c"), check=False)
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: dataset {harmless}: its rows are unpaired (prompt, completion, label): they "
        "train with --loss-type kto, not with loss_type sigmoid, which needs pairs")


def ranked_rows(pairs: list[dict]) -> list[dict]:
    """Rankings of 3 responses made from pairs (prompt, chosen, rejected): the chosen (rank 1),
    the rejected (rank 2), and a third (rank 3) made from the rejected: its first half of words,
    then "I can't say more." — a worse, cut-short answer. Listed in a shuffled order."""
    rows = []
    for i, pair in enumerate(pairs):
        words = pair["rejected"].split()
        third = " ".join(words[:max(1, len(words) // 2)]) + " I can't say more."
        order = [(pair["rejected"], 2), (third, 3), (pair["chosen"], 1)][i % 3:] + \
            [(pair["rejected"], 2), (third, 3), (pair["chosen"], 1)][:i % 3]
        rows.append({"prompt": pair["prompt"], "responses": [text for text, _ in order],
                     "ranks": [rank for _, rank in order]})
    return rows


@pytest.mark.shared
def test_rankings_train_end_to_end_on_hh_rlhf_rows(env, qwen3_tiny, tmp_path):
    """Plackett–Luce DPO end to end on rankings of 3 responses built from real HH-RLHF pairs
    (`ranked_rows`: chosen ≻ rejected ≻ the rejected cut in half), a tiny Qwen3 with the real
    Qwen3 tokenizer, the prompt shared by the 3 responses where the start-up check allows.
    Step 1 starts at π = π_ref: every reward is 0, so the loss is log 3 + log 2 = log 6 and no
    pair is ordered (accuracy 0); eval logs the ranking metrics. Too many responses for
    max_responses, ties in ranks under --strict-data, and a pair loss stop with one line."""
    import gzip
    import math

    with gzip.open(require_shared(HH_HELPFUL), "rt") as f:
        transcripts = [json.loads(next(f)) for _ in range(16)]
    pairs = []
    for row in transcripts:
        cut = row["chosen"].rindex("\n\nAssistant:")
        prompt, after = row["chosen"][:cut], len("\n\nAssistant:")
        if not row["rejected"].startswith(prompt + "\n\nAssistant:"):
            continue  # the two responses follow different prompts
        pairs.append({"prompt": prompt + "\n\nAssistant:",
                      "chosen": row["chosen"][cut + after:].strip(),
                      "rejected": row["rejected"][cut + after:].strip()})
    data = _write_jsonl(tmp_path / "ranked.jsonl", ranked_rows(pairs[:12]))
    common = ["--model", str(qwen3_tiny), "--dataset", str(data), "--max-length", "256",
              "--batch-size", "4", "--gradient-accumulation-steps", "1", "--learning-rate",
              "1e-3", "--logging-steps", "1", "--num-sample-generations", "0", "--seed", "5",
              "--num-samples", "12", "--eval-samples", "4"]
    out = tmp_path / "out"
    result = run(env, *common, "--max-steps", "3", "--eval-steps", "3", "--output-dir", str(out))
    assert "train pairs: kept 8 of 8 pairs" in result.stdout
    train = train_logs(out)
    assert [log["step"] for log in train] == [1, 2, 3]
    assert set(PAIR_KEYS) <= set(train[0])
    assert train[0]["loss"] == pytest.approx(math.log(6), abs=1e-4)
    assert train[0]["rewards/accuracies"] == 0 and train[-1]["loss"] < train[0]["loss"]
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"} <= set(results)
    card = (out / "README.md").read_text()
    assert "trained with Plackett–Luce DPO over rankings" in card
    assert "8 training rankings, 4 held-out eval rankings" in card

    small = ["--max-steps", "1", "--output-dir"]
    bad = run(env, *common, "--max-responses", "2", *small, str(tmp_path / "b"), check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith(
        f"error: dataset {data}: row 0 ranks 3 responses, over max_responses 2 ")
    rows = ranked_rows(pairs[:12])
    tied = _write_jsonl(tmp_path / "tied.jsonl", [{**rows[0], "ranks": [1, 1, 3]}, *rows[1:]])
    bad = run(env, *common[:2], "--dataset", str(tied), *common[4:], "--strict-data", *small,
              str(tmp_path / "c"), check=False)
    assert "row 0: bad_ranks: ranks [1, 1, 3]: 1 is given twice (strict mode)" in \
        bad.stderr.strip().splitlines()[-1]
    bad = run(env, *common, "--loss-type", "ipo", *small, str(tmp_path / "d"), check=False)
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: dataset {data}: its rows are rankings: loss_type ipo (and rpo_alpha) reads "
        "pairs; rankings train with loss_type sigmoid")
