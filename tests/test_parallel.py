"""Every parallel path against one process, on CPU: real processes over gloo, a tiny model.

Each run trains the offline demo model for 4 optimizer steps on the same pairs with the same
global batch of 4 pairs (processes × per-device batch × accumulation), logging every step and
evaluating at steps 2 and 4. The length-grouped sampler defines the pairs of each optimizer step
over the global batch, so every layout must see the same pairs in every step: per-step metrics
and final weights must agree with the single-process run. Gradient clipping at 1.0 is active in
these steps (the demo's gradient norm is ~3), so a layout where clipping did not reach the
optimizer (DeepSpeed clips inside its engine) would drift.
"""
import json
import math
import subprocess

import pytest
import torch

from tests.conftest import ROOT, SHARED_DATA, require_shared
from tests.e2e import (ACCELERATE, PYTHON, TORCHRUN, assert_same_logs, assert_same_weights,
                       demo_env, eval_logs, free_port, run_train, train_logs, weights_equal)

pytestmark = [pytest.mark.slow, pytest.mark.parallel]

COMMON = ["--model", "builtin:tiny-qwen3", "--dataset", "builtin:demo-preferences",
          "--num-samples", "48", "--eval-samples", "10", "--max-length", "64", "--max-steps", "4",
          "--logging-steps", "1", "--eval-steps", "2", "--learning-rate", "1e-3",
          "--num-sample-generations", "1", "--max-new-tokens", "4", "--seed", "7"]
GEOMETRY = {1: ["--batch-size", "4", "--gradient-accumulation-steps", "1"],
            2: ["--batch-size", "2", "--gradient-accumulation-steps", "1"]}
# (launcher + its flags, processes) per layout; None for layouts with their own recipe.
LAYOUTS = {
    "ddp": [*ACCELERATE, "--multi_gpu", "--num_processes", "2"],
    "zero2_json": [*ACCELERATE, "--config_file", "configs/accelerate/zero2.yaml",
                   "--num_processes", "2"],
    "zero2_flags": [*ACCELERATE, "--use_deepspeed", "--zero_stage", "2", "--num_processes", "2"],
    "zero3_json": [*ACCELERATE, "--config_file", "configs/accelerate/zero3.yaml",
                   "--num_processes", "2"],
    "zero3_flags": [*ACCELERATE, "--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag",
                    "true", "--num_processes", "2"],
    "torchrun": [*TORCHRUN, "--nproc_per_node", "2"],
}
PORT_FLAG = {"torchrun": "--master_port"}
# Run variants: "<layout>+<extra>".
HH_HARMLESS = SHARED_DATA / "hh_rlhf_harmless_base_test.jsonl.gz"
MPO = ["--loss-type", "sigmoid", "bco_pair", "sft", "--loss-weights", "0.8", "0.2", "1"]
WPO_LD = ["--use-weighting", "--ld-alpha", "0.5"]
EXTRA_FLAGS = {"": [], "precompute": ["--precompute-ref-logps"], "rpo": ["--rpo-alpha", "0.5"],
               "orpo": ["--loss-type", "orpo"],
               # packed: separate sequences end to end (the default on CPU shares their prompts)
               "packed": ["--padding-free", "--no-share-prompt"], "padded": ["--no-padding-free"],
               "packed_precompute": ["--padding-free", "--no-share-prompt",
                                     "--precompute-ref-logps"],
               "trdpo": ["--sync-ref-model", "--ref-model-sync-steps", "2",
                         "--ref-model-mixup-alpha", "0.5"],
               "mpo": MPO, "mpo_packed": [*MPO, "--padding-free"],
               "shared": ["--share-prompt", "--no-padding-free"],
               "shared_packed": ["--share-prompt", "--padding-free"],
               "shared_precompute": ["--share-prompt", "--precompute-ref-logps"],
               "kto": ["--loss-type", "kto"],
               "wpo_ld": WPO_LD, "wpo_ld_packed": [*WPO_LD, "--padding-free"],
               # 36 + 12 rows drawn; 11 eval rows: 8 of the demo's test split, 3 held-out HH pairs
               "mixture": ["--dataset", "builtin:demo-preferences", str(HH_HARMLESS),
                           "--dataset-weights", "3", "1", "--eval-samples", "11"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return demo_env(tmp_path_factory.mktemp("dpo_cache"))


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    """Run a layout once per module; `runs(name)` returns (output dir, stdout + stderr)."""
    done = {}

    def get(name):
        if name not in done:
            layout, _, extra = name.partition("+")  # "ddp+precompute": with precomputed ref
            extra = EXTRA_FLAGS[extra]
            out = tmp_path_factory.mktemp(name.replace("+", "_")) / "out"
            if layout == "single":
                launcher, geometry = PYTHON, GEOMETRY[1]
            elif layout == "accumulation":  # 1 pair per micro-batch, 4 micro-batches per step
                launcher, geometry = PYTHON, ["--batch-size", "1",
                                              "--gradient-accumulation-steps", "4"]
            else:
                port = [PORT_FLAG.get(layout, "--main_process_port"), str(free_port())]
                launcher, geometry = [*LAYOUTS[layout], *port], GEOMETRY[2]
            # torchrun's own processes: test_torchrun_equals_accelerate_launch holds the forked
            # launches (tests/launch.py) to them
            result = run_train(env, *COMMON, *geometry, *extra, "--output-dir", str(out),
                               launcher=launcher, fork=layout != "torchrun")
            done[name] = out, result.stdout + result.stderr
        return done[name]

    return get


def test_gradient_accumulation_matches_one_big_batch(runs):
    """1 pair × 4 accumulation steps = 4 pairs × 1: the loss is normalised per optimizer step."""
    single, _ = runs("single")
    accumulated, _ = runs("accumulation")
    assert_same_logs(train_logs(accumulated), train_logs(single), rel=1e-5)
    assert_same_weights(accumulated, single, rel=1e-5)


def test_rpo_term_is_a_token_mean_over_the_optimizer_step(runs):
    """With the RPO term (a token mean), 1 pair × 4 accumulation steps = 4 pairs × 1 = 2
    processes × 2 pairs: each micro-batch divides by the step's tokens, not by its own."""
    single, _ = runs("single+rpo")
    for layout in ("accumulation+rpo", "ddp+rpo"):
        out, _ = runs(layout)
        assert_same_logs(train_logs(out), train_logs(single), rel=1e-4)
        assert_same_weights(out, single, rel=1e-5 if layout.startswith("acc") else 1e-4)
    # The term is on: the weights differ from a run without it.
    assert not weights_equal(single, runs("single")[0])


def test_orpo_is_the_same_under_accumulation(runs):
    """ORPO's NLL is sft's token mean over the optimizer step, its odds-ratio term a mean over
    the step's pairs: 1 pair × 4 accumulation steps = 4 pairs × 1, with no reference loaded."""
    single, output = runs("single+orpo")
    assert "reference:" not in output
    out, _ = runs("accumulation+orpo")
    assert_same_logs(train_logs(out), train_logs(single), rel=1e-5)
    assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-5)
    assert_same_weights(out, single, rel=1e-5)


def test_a_loss_mixture_is_the_same_however_the_step_is_split(runs):
    """MPO (sigmoid + bco_pair + sft): BCO's baseline moves once per optimizer step from the
    rewards of every micro-batch and process, and sft is a token mean over the step, so 1 pair ×
    4 accumulation steps = 2 processes × 2 pairs = 4 pairs × 1 = packed (padding-free), each term
    logged as loss/<type>."""
    single, _ = runs("single+mpo")
    logs = train_logs(single)
    for log in logs:
        parts = 0.8 * log["loss/sigmoid"] + 0.2 * log["loss/bco_pair"] + log["loss/sft"]
        assert log["loss"] == pytest.approx(parts, rel=1e-5)
    assert logs[-1]["loss/bco_pair"] != pytest.approx(logs[0]["loss/bco_pair"], rel=1e-3)
    for layout in ("accumulation+mpo", "ddp+mpo", "single+mpo_packed"):
        out, _ = runs(layout)
        assert_same_logs(train_logs(out), logs, rel=1e-4)
        assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-4)
        assert_same_weights(out, single, rel=1e-4 if layout.startswith("ddp") else 1e-5)


def test_kto_on_two_processes_takes_one_kl_estimate_over_both(runs):
    """KTO's z₀ is an all-reduce over the processes' mismatched pairs at every micro-batch (and
    eval batch): two processes train and evaluate without waiting on each other, start at loss
    ½ with z₀ = 0, and log the class metrics. (Its mismatched pairs are made within each
    process's micro-batch, so the run is not the one-process run: no equality to assert.)"""
    out, log = runs("ddp+kto")
    logs = train_logs(out)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-6) and logs[0]["kl"] == 0.0
    assert all(entry["kl"] >= 0 for entry in logs) and logs[-1]["kl"] > 0
    assert [entry["step"] for entry in eval_logs(out)] == [2, 4]
    assert {"eval/kl", "eval/rewards/chosen", "eval/rewards/rejected"} <= set(eval_logs(out)[-1])


def test_rankings_on_two_processes_match_one(env, tmp_path):
    """Rankings (3 responses from each demo pair, every third row cut to its best two, so that
    micro-batches mix N = 3 and N = 2) under Plackett–Luce: each row's loss is its own, so 2
    DDP processes × 2 rankings train as 1 × 4, in the layout start-up settles (packed, the
    prompt shared by a ranking's responses, on CPU): per-step logs, eval and weights."""
    from dpo.demo.build import demo_pairs
    from tests.test_train import _write_jsonl, ranked_rows

    rows = ranked_rows(demo_pairs()[0][:48])
    for row in rows[::3]:
        keep = [i for i, rank in enumerate(row["ranks"]) if rank < 3]
        row["responses"], row["ranks"] = ([row["responses"][i] for i in keep],
                                          [row["ranks"][i] for i in keep])
    data = str(_write_jsonl(tmp_path / "ranked.jsonl", rows))
    outs = {}
    for layout, launcher, geometry in (("single", PYTHON, GEOMETRY[1]),
                                       ("ddp", [*LAYOUTS["ddp"], "--main_process_port",
                                                str(free_port())], GEOMETRY[2])):
        outs[layout] = tmp_path / layout
        run_train(env, *COMMON, *geometry, "--dataset", data, "--eval-samples", "8",
                  "--output-dir", str(outs[layout]), launcher=launcher)
    logs = train_logs(outs["single"])
    # At π = π_ref a ranking of 3 costs log 6, one of 2 log 2: the first step has both.
    assert math.log(2) + 0.1 < logs[0]["loss"] < math.log(6)
    assert_same_logs(train_logs(outs["ddp"]), logs, rel=1e-4)
    assert_same_logs(eval_logs(outs["ddp"]), eval_logs(outs["single"]), rel=1e-4)
    assert_same_weights(outs["ddp"], outs["single"], rel=1e-4)


def test_sampled_answers_are_the_same_on_one_and_two_processes(env, tmp_path):
    """Online DPO's samples (`sample_answers`, tests/sampling_probe.py: 5 prompts in batches of
    2, k = 3) are the same on 2 DDP processes (batches 0-1 and 2) as on one, each process's own
    random stream seeded apart; also in the lockstep of ZeRO-3/FSDP (`--synced`), where the
    second process repeats a batch and `synced_gpus` keeps both stepping."""
    from tests.e2e import run_launched, run_python

    def samples(name, launcher=None, *flags):
        out = tmp_path / f"{name}.json"
        args = ["tests/sampling_probe.py", str(out), *flags]
        result = (run_python(args, env) if launcher is None else
                  run_launched([*launcher, "--main_process_port", str(free_port()), *args], env))
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(out.read_text())

    one = samples("one")
    assert [len(answers) for answers in one] == [3] * 5
    assert len({s["text"] for answers in one for s in answers}) == 15
    assert samples("ddp", LAYOUTS["ddp"]) == one
    assert samples("synced", LAYOUTS["ddp"], "--synced") == one


def test_wpo_and_ld_dpo_are_the_same_on_two_processes_and_packed(runs):
    """WPO's weights and LD-DPO's split are per pair, and a pair's two responses always share a
    micro-batch: 2 processes × 2 pairs and packed (padding-free) batches equal 4 pairs in one."""
    single, _ = runs("single+wpo_ld")
    logs = train_logs(single)
    assert all(0 < log["weights/mean"] < 1 for log in logs)
    for layout in ("ddp+wpo_ld", "single+wpo_ld_packed"):
        out, _ = runs(layout)
        assert_same_logs(train_logs(out), logs, rel=1e-4)
        assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-4)
        assert_same_weights(out, single, rel=1e-4 if layout.startswith("ddp") else 1e-5)


def test_a_synced_reference_is_the_same_on_two_processes_and_under_zero3(runs):
    """TR-DPO (reference ← ½·policy + ½·reference every 2 steps): DDP (a replica each) and
    ZeRO-3 (both models sharded, gathered pair by pair) equal one process; the sync shows in the
    numbers from step 3 on, not before."""
    single, _ = runs("single+trdpo")
    frozen = train_logs(runs("single")[0])
    synced = train_logs(single)
    assert_same_logs(synced[:2], frozen[:2], rel=1e-6)
    assert synced[2]["rewards/chosen"] != pytest.approx(frozen[2]["rewards/chosen"], rel=1e-3)
    for layout in ("ddp+trdpo", "zero3_flags+trdpo"):
        out, _ = runs(layout)
        assert_same_logs(train_logs(out), synced, rel=1e-4)
        assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-4)
        assert_same_weights(out, single, rel=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_processes_match_one(runs, layout):
    """Per-step train metrics (reduced across processes), eval metrics (gathered) and final
    weights of 2 processes × 2 pairs equal those of 1 process × 4 pairs."""
    single, _ = runs("single")
    out, log = runs(layout)
    assert "2 process(es)" in log
    assert_same_logs(train_logs(out), train_logs(single), rel=1e-4)
    assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-4)
    assert_same_weights(out, single, rel=1e-4)


def test_a_mixture_is_evaluated_per_dataset_alike_on_two_processes(runs):
    """A mixture's eval logs each dataset (`eval/<name>/...`) beside the whole, which is their
    pair-weighted mean; on 2 processes, whose last eval batch repeats a pair to even them out,
    every number equals 1 process's. Each dataset's filter report is printed."""
    require_shared(HH_HARMLESS)
    single, log = runs("single+mixture")
    assert "train pairs (hh_rlhf_harmless_base_test): kept" in log
    logs = eval_logs(single)
    assert len(logs) == 2
    for entry in logs:
        demo, hh = (entry[f"eval/{name}/loss"]
                    for name in ("demo-preferences", "hh_rlhf_harmless_base_test"))
        assert entry["eval/loss"] == pytest.approx((8 * demo + 3 * hh) / 11, rel=1e-6)
        assert demo != pytest.approx(hh, rel=1e-6)
    out, _ = runs("ddp+mixture")
    assert_same_logs(eval_logs(out), logs, rel=1e-4)
    assert_same_logs(train_logs(out), train_logs(single), rel=1e-4)


@pytest.mark.parametrize("layout", ["zero3_json", "zero3_flags"])
def test_zero3_shards_the_reference_and_saves_the_full_model(runs, layout):
    from transformers import AutoModelForCausalLM

    out, log = runs(layout)
    assert "reference: sharded, a DeepSpeed ZeRO-3 inference engine" in log
    model = AutoModelForCausalLM.from_pretrained(out)
    single = AutoModelForCausalLM.from_pretrained(runs("single")[0])
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in single.parameters())


@pytest.mark.parametrize("layout", ["single", "ddp", "zero3_flags"])
def test_precomputed_reference_matches_the_live_one(runs, layout):
    """`--precompute-ref-logps`: each process computes its share of the pairs (under ZeRO-3 with
    the sharded reference engine), the values are combined, and the run trains like the live
    reference: 1e-5 in one process, the parallel bound across two. (The pass lays other pairs
    side by side in its shared-prompt rows than training does: at step 1 the rewards are ~1e-7,
    not exactly 0, and which of them come out "accurate" is noise.)"""
    single, _ = runs("single")
    out, log = runs(f"{layout}+precompute")
    assert "reference: freed; training on its precomputed log-probs" in log
    rel = 1e-5 if layout == "single" else 1e-4
    assert_same_logs(train_logs(out), train_logs(single), rel=rel,
                     skip=("tokens_per_sec", "padding_fraction", "rewards/accuracies"))
    assert_same_logs(eval_logs(out), eval_logs(single), rel=rel)
    assert_same_weights(out, single, rel=rel)


def test_padding_free_two_processes_match_one(runs):
    """Packed batches (the default for the demo's sdpa model, and what `--padding-free` asks
    for) train as padded ones (`--no-padding-free`) in one process, to 1e-5 (rounding), with
    padding_fraction 0 where the padded run logs some; 2 processes packed (DDP with the live
    reference; ZeRO-3, the sharded reference precomputing on packed batches) and 2 processes
    padded (DDP) equal 1 process packed to 1e-4: train and eval metrics, final weights. (The
    precompute pass packs other pairs together than training does, which changes the rounding:
    at step 1 the rewards are ~1e-7, not exactly 0, and which of them come out "accurate" is
    noise.)"""
    single, _ = runs("single+packed")
    logs = train_logs(single)
    padded, _ = runs("single+padded")
    assert all(log["padding_fraction"] == 0.0 for log in logs)
    assert all(log["padding_fraction"] > 0.0 for log in train_logs(padded))
    assert_same_logs(logs, train_logs(padded), rel=1e-5)
    assert_same_logs(eval_logs(single), eval_logs(padded), rel=1e-5)
    assert_same_weights(single, padded, rel=1e-5)
    for layout in ("ddp+packed", "zero3_flags+packed_precompute", "ddp+padded"):
        out, log = runs(layout)
        assert "2 process(es)" in log
        noise = ("rewards/accuracies",) if layout.endswith("precompute") else ()
        assert_same_logs(train_logs(out), logs, rel=1e-4,
                         skip=("tokens_per_sec", "padding_fraction", *noise))
        assert all((entry["padding_fraction"] == 0.0) == layout.endswith(("packed", "precompute"))
                   for entry in train_logs(out))
        assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-4)
        assert_same_weights(out, single, rel=1e-4)


def test_shared_prompts_train_as_separate_sequences(runs):
    """`--share-prompt` (each pair once as [prompt | chosen | rejected]), a pair per row or
    packed (the default for the demo's sdpa model on CPU), trains as packed separate sequences
    do in one process (1e-5), and on 2 processes (DDP with the live reference, ZeRO-3 with the
    sharded reference precomputing on shared batches) as one process (1e-4): train and eval
    metrics, final weights."""
    default, log = runs("single")
    assert "padding-free batches: on" in log and "shared-prompt batches: on" in log
    assert_same_logs(train_logs(default), train_logs(runs("single+shared_packed")[0]), rel=0,
                     skip=("tokens_per_sec",))
    assert "shared-prompt batches: off (measured only on packed rows" in runs("single+padded")[1]
    single, _ = runs("single+packed")
    for layout in ("single+shared", "single+shared_packed"):
        out, log = runs(layout)
        assert "shared-prompt batches: on" in log
        assert_same_logs(train_logs(out), train_logs(single), rel=1e-5)
        assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-5)
        assert_same_weights(out, single, rel=1e-5)
    for layout in ("ddp+shared", "zero3_flags+shared_precompute"):
        out, _ = runs(layout)
        assert_same_logs(train_logs(out), train_logs(single), rel=1e-4,
                         skip=("tokens_per_sec", "padding_fraction", "rewards/accuracies"))
        assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-4)
        assert_same_weights(out, single, rel=1e-4)


def test_reference_placement_is_reported(runs):
    for layout in ("ddp", "zero2_json"):
        assert "reference: a frozen replica on cpu in every process" in runs(layout)[1]


FSDP = [*ACCELERATE, "--config_file", "configs/accelerate/fsdp.yaml", "--mixed_precision", "no"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fsdp_on_cpu_is_refused_not_faked(env, tmp_path):
    """accelerate 1.15 sets FSDP up on accelerators only; on CPU it would quietly run plain DDP
    (or two unconnected processes). The run must stop with one clear line instead."""
    result = run_train(env, *COMMON, *GEOMETRY[2], "--output-dir", str(tmp_path / "out"),
                       check=False, launcher=[*FSDP, "--num_processes", "2",
                                              "--main_process_port", str(free_port())])
    assert result.returncode != 0
    assert "error: FSDP needs GPUs" in result.stderr
    assert not (tmp_path / "out").exists()


def test_fsdp_config_reaches_accelerate(env, tmp_path):
    """As far as FSDP goes on CPU: the launcher turns configs/accelerate/fsdp.yaml into the FSDP
    plugin train.py would get (version 2, one unit per Qwen3 decoder layer)."""
    script = tmp_path / "show_plugin.py"
    script.write_text(
        "import os\n"
        "from accelerate.utils import FullyShardedDataParallelPlugin as P\n"
        "p = P()\n"
        "print('FSDP', os.environ['ACCELERATE_USE_FSDP'], p.fsdp_version,\n"
        "      os.environ['FSDP_TRANSFORMER_CLS_TO_WRAP'], p.reshard_after_forward)\n")
    out = subprocess.run([*FSDP, "--num_processes", "1", str(script)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "FSDP true 2 Qwen3DecoderLayer True" in out.stdout, out.stderr[-2000:]


def test_torchrun_equals_accelerate_launch(runs):
    """A real torchrun launch equals `accelerate launch --multi_gpu` as the tests run it, its
    processes forked with the environment accelerate builds (tests/launch.py)."""
    assert_same_logs(train_logs(runs("torchrun")[0]), train_logs(runs("ddp")[0]), rel=1e-6)
    assert_same_weights(runs("torchrun")[0], runs("ddp")[0], rel=1e-6)


def test_two_local_nodes_on_loopback(env, runs, tmp_path):
    """Multi-node as documented: the same command on each "machine" with its machine rank,
    here two processes on 127.0.0.1 playing one machine each."""
    out, port = tmp_path / "out", str(free_port())
    commands = [[*ACCELERATE, "--config_file", "configs/accelerate/multinode.yaml",
                 "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                 "--mixed_precision", "no", "train.py", *COMMON, *GEOMETRY[2],
                 "--output-dir", str(out)] for rank in (0, 1)]
    nodes = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert_same_logs(train_logs(out), train_logs(runs("single")[0]), rel=1e-4)
    assert_same_weights(out, runs("single")[0], rel=1e-4)


def test_bf16_autocast_runs_on_cpu(env, tmp_path):
    """`--mixed_precision bf16` goes through `accelerator.autocast()`: matmuls in bf16, log-probs
    summed in fp32; on tiny shapes the first step still starts at ln 2."""
    out = tmp_path / "out"
    run_train(env, *COMMON, *GEOMETRY[1], "--max-steps", "2", "--eval-steps", "100",
              "--output-dir", str(out),
              launcher=[*ACCELERATE, "--num_processes", "1", "--mixed_precision", "bf16"])
    logs = train_logs(out)
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=1e-2)
    assert all(abs(v) < 1e6 for log in logs for v in log.values())


def test_fp16_on_cpu_is_refused(env, tmp_path):
    """fp16 without a GPU would get neither autocast nor loss scaling: a clear error instead."""
    result = run_train(env, *COMMON, "--output-dir", str(tmp_path / "out"), check=False,
                       launcher=[*ACCELERATE, "--num_processes", "1", "--mixed_precision",
                                 "fp16"])
    assert result.returncode != 0
    assert "fp16 needs a GPU" in result.stderr
    assert not (tmp_path / "out").exists()


def _uneven_pairs(tmp_path) -> str:
    """A local dataset (train and test splits) whose responses are a few or ~70 tokens long,
    half each. Rows are drawn shuffled, so at chunk size 8 the two processes' numbers of
    response tokens, hence of LM-head calls, differ in most micro-batches."""
    from dpo.demo import demo_pairs

    def shorten(row):
        return {key: text.split(".")[0] + "." for key, text in row.items()}

    def lengthen(row):
        return {**row, "chosen": " ".join([row["chosen"]] * 3),
                "rejected": " ".join([row["rejected"]] * 3)}

    rows, test = demo_pairs()
    folder = tmp_path / "uneven"
    folder.mkdir()
    for name, source in (("train", rows[:32]), ("test", test[:16])):
        pairs = [lengthen(r) if i % 2 else shorten(r) for i, r in enumerate(source)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return str(folder)


@pytest.fixture(scope="module")
def uneven_runs(env, tmp_path_factory):
    """ZeRO-3 with the chunked head at chunk size 8 on responses of very different lengths per
    process (so the processes make different numbers of LM-head calls), against 1 process."""
    data = _uneven_pairs(tmp_path_factory.mktemp("uneven_data"))
    common = [*COMMON, "--dataset", data, "--num-samples", "none", "--max-length", "160",
              "--eval-samples", "16", "--logps-chunk-size", "8", "--no-group-by-length",
              "--eval-on-start"]
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name.replace("+", "_")) / "out"
            extra = ["--precompute-ref-logps"] if name.endswith("+precompute") else []
            if name.startswith("single"):
                launcher, geometry = PYTHON, GEOMETRY[1]
            else:
                launcher = [*LAYOUTS["zero3_flags"], "--main_process_port", str(free_port())]
                geometry = GEOMETRY[2]
            # A hang (the bug this guards against) would stop here at the timeout, not forever.
            run_train(env, *common, *geometry, *extra, "--output-dir", str(out),
                      launcher=launcher, timeout=300)
            done[name] = out
        return done[name]

    return get


@pytest.mark.parametrize("name", ["zero3", "zero3+precompute"])
def test_zero3_chunked_head_with_uneven_lengths_matches_one_process(uneven_runs, name):
    """Every process makes the same number of LM-head calls (each all-gathers the ZeRO-3
    sharded head): training, eval and the precompute pass finish and equal 1 process."""
    single = uneven_runs("single")
    out = uneven_runs(name)
    assert_same_logs(train_logs(out), train_logs(single), rel=1e-4)
    assert_same_logs(eval_logs(out), eval_logs(single), rel=1e-4)
    assert_same_weights(out, single, rel=1e-4)
