"""Crash safety: SIGKILL at seeded random points, mid-save kills, and resume's refusals.

The reference is one uninterrupted run of 16 optimizer steps over two epochs (48 pairs, 4 per
step, so 12 steps per epoch), saving a checkpoint after every step. A killed run resumed with
`--resume-from-checkpoint latest` must end with bit-identical weights (CPU, fp32) and the same
metrics, every step logged exactly once.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch
import torch.multiprocessing as mp

from dpo.train.checkpoint import checkpoints
from tests.conftest import ROOT
from tests.e2e import (ACCELERATE, Started, assert_same_logs, demo_env, free_port, read_metrics,
                       run_python, run_train, train_logs, weights_equal)

pytestmark = pytest.mark.slow

RUN = ["--model", "builtin:tiny-qwen3", "--dataset", "builtin:demo-preferences",
       "--num-samples", "48", "--eval-samples", "0", "--max-length", "64", "--batch-size", "2",
       "--gradient-accumulation-steps", "2", "--max-steps", "16", "--logging-steps", "1",
       "--save-steps", "1", "--learning-rate", "1e-3", "--seed", "11"]
KILL_STEPS = sorted(random.Random(2026).sample(range(3, 16), 3))  # seeded "random" points


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return demo_env(tmp_path_factory.mktemp("dpo_cache"))


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    run_train(env, *RUN, "--output-dir", str(out))
    assert [log["step"] for log in train_logs(out)] == list(range(1, 17))
    return out


def start(env, out, *extra) -> Started:
    return Started(["train.py", *RUN, "--output-dir", str(out), *extra], env)


def wait_for(proc: Started, line_start: str, timeout=300):
    """Until a line of the run's output starts with `line_start`."""
    deadline = time.monotonic() + timeout
    while not any(line.startswith(line_start) for line in proc.lines):
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.001)


def resume_and_compare(env, out, reference, *extra):
    run_train(env, *RUN, "--output-dir", str(out), "--resume-from-checkpoint", "latest", *extra)
    assert weights_equal(out, reference)
    assert [log["step"] for log in train_logs(out)] == list(range(1, 17))
    assert_same_logs(read_metrics(out), read_metrics(reference), rel=1e-6)


def kill_and_resume(env, tmp_path, extra, kill_step, check=None):
    """An uninterrupted run with the flags `extra`, then one SIGKILLed as soon as step
    `kill_step` is logged (`check(out)` then looks at what it left) and resumed: it must end
    bit-identical to the first. Returns the uninterrupted run's output directory."""
    reference = tmp_path / "reference"
    run_train(env, *RUN, "--output-dir", str(reference), *extra)
    out = tmp_path / "out"
    proc = start(env, out, *extra)
    wait_for(proc, f"step {kill_step}:")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoints(out), "at least one complete checkpoint before the kill"
    if check is not None:
        check(out)
    resume_and_compare(env, out, reference, *extra)
    return reference


@pytest.mark.parametrize("kill_step", KILL_STEPS)
def test_sigkill_then_resume_is_exact(env, reference, tmp_path, kill_step):
    """SIGKILL as soon as step `kill_step` is logged (its checkpoint may be half-written)."""
    out = tmp_path / "out"
    proc = start(env, out)
    wait_for(proc, f"step {kill_step}:")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoints(out), "at least one complete checkpoint before the kill"
    resume_and_compare(env, out, reference)


def test_sigkill_then_resume_is_exact_with_precomputed_reference(env, tmp_path):
    """With `--precompute-ref-logps` the resumed run reads the reference's log-probs back from
    the cache the killed run wrote: still bit-identical to an uninterrupted run."""
    kill_and_resume(env, tmp_path, ["--precompute-ref-logps"], KILL_STEPS[-1])


def test_sigkill_then_resume_is_exact_with_orpo(env, tmp_path):
    """ORPO (no reference; its NLL divided by each step's chosen tokens, counted from the
    sampler's batches of the epoch): a killed run resumes mid-epoch bit-identical."""
    kill_and_resume(env, tmp_path, ["--loss-type", "orpo"], KILL_STEPS[1])


def test_sigkill_then_resume_is_exact_with_bco_baseline_and_a_synced_reference(env, tmp_path):
    """What checkpoints hold beside the model: BCO's baseline δ (the running mean of the rewards)
    and TR-DPO's reference, updated every 3 steps. A killed run resumes with the δ and the
    reference it had — not 0 and the starting model — and ends bit-identical."""
    extra = ["--loss-type", "bco_pair", "sft", "--loss-weights", "1", "0.1", "--sync-ref-model",
             "--ref-model-sync-steps", "3", "--ref-model-mixup-alpha", "0.5"]

    def check(out):
        last = checkpoints(out)[-1]
        assert int(last.name.split("-")[1]) > 3, "a reference sync before the last checkpoint"
        bco = torch.load(last / "custom_checkpoint_0.pkl", weights_only=False)
        assert bco["count"] > 0 and bco["mean"] != 0
        assert (last / "custom_checkpoint_1.pkl").is_file()  # the synced reference

    kill_and_resume(env, tmp_path, extra, KILL_STEPS[2], check)


def test_sigkill_then_resume_is_exact_with_kto(env, tmp_path):
    """KTO on the demo pairs made unpaired: each micro-batch's mismatched completions (the
    collator's rotation) and KL estimate come back the same after a resume: bit-identical."""
    reference = kill_and_resume(env, tmp_path, ["--loss-type", "kto", "--desirable-weight",
                                                 "1.3"], KILL_STEPS[1])
    assert all(log["kl"] >= 0 for log in train_logs(reference))


@pytest.mark.parametrize("save_step, point", zip(KILL_STEPS, ["mid-state", "before-rename",
                                                                "mid-state"]))
def test_kill_during_a_save_keeps_the_previous_checkpoint(env, reference, tmp_path, save_step,
                                                          point):
    """SIGKILL while checkpoint `save_step` is being written (`tests/kill_during_save.py`): it
    never appears under its final name, the previous one is `latest`, and resuming from it is
    still exact."""
    out = tmp_path / "out"
    killed = run_python(["tests/kill_during_save.py", str(save_step), point, *RUN,
                         "--output-dir", str(out)], env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / f".tmp-checkpoint-{save_step}").is_dir()  # the half-written save
    assert [p.name for p in checkpoints(out)][-1] == f"checkpoint-{save_step - 1}"
    resume_and_compare(env, out, reference)


def test_resume_refuses_changed_run_identity(env, reference, tmp_path):
    """Model, data, tokenization and batch geometry must match the checkpoint's run."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    result = run_train(env, *RUN, "--output-dir", str(out), "--resume-from-checkpoint", "latest",
                       "--batch-size", "4", "--gradient-accumulation-steps", "1", "--max-length",
                       "48", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    for changed in ("batch_size 2 -> 4", "gradient_accumulation_steps 2 -> 1",
                    "max_length 64 -> 48"):
        assert changed in line


def test_resume_warns_about_other_changed_settings(env, reference, tmp_path):
    """Settings that do not change which pairs are seen (here the learning rate and the step
    count) may change on resume; they are named in a warning."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    for name in ("model.safetensors", "eval_results.json"):
        (out / name).unlink(missing_ok=True)
    for ckpt in checkpoints(out)[8:]:
        shutil.rmtree(ckpt)
    result = run_train(env, *RUN[:-4], "--learning-rate", "5e-4", "--seed", "11",
                       "--max-steps", "10", "--output-dir", str(out),
                       "--resume-from-checkpoint", "latest")
    assert "warning: resuming with changed settings: max_steps, learning_rate" in result.stdout
    assert [log["step"] for log in train_logs(out)] == list(range(1, 11))


def test_a_checkpoint_saved_before_later_settings_resumes(tmp_path):
    """A checkpoint whose settings predate fields added since (saved with `use_chat_template`,
    without `chat_template`, `tokenize_cache`, ...) resumes: a missing field had its default,
    and `use_chat_template: true` is `chat_template: auto`. A real change is still refused."""
    import dataclasses

    from dpo.train.checkpoint import STATE_FILE, check_resume
    from dpo.config import ConfigError, TrainConfig

    cfg = TrainConfig()
    old = {k: v for k, v in dataclasses.asdict(cfg).items()
           if k not in ("chat_template", "prompt_template", "tokenize_cache")}
    old.update(use_chat_template=True, num_processes=1)
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 1, "config": old}))
    assert check_resume(tmp_path, cfg, num_processes=1) == []
    with pytest.raises(ConfigError, match="chat_template 'auto' -> 'plain'"):
        check_resume(tmp_path, dataclasses.replace(cfg, chat_template="plain"), num_processes=1)


def test_an_incomplete_checkpoint_is_refused(env, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    partial = out / ".tmp-checkpoint-17"
    shutil.copytree(out / "checkpoint-16", partial)
    result = run_train(env, *RUN, "--output-dir", str(out),
                       "--resume-from-checkpoint", str(partial), check=False)
    assert result.returncode != 0 and "not a complete checkpoint" in result.stderr


def _node_worker(rank: int, port: int, base: str, shared: bool, results: dict) -> None:
    """One of two processes, each the local main process of its own "node" (LOCAL_RANK 0); the
    nodes' output directories are one directory (`shared`) or one each, as on machines without
    a shared filesystem."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(1)
    from pathlib import Path

    from accelerate import Accelerator

    from dpo.train.checkpoint import (STATE_FILE, agree_on_resume, detect_shared_output_dir,
                                load_checkpoint, save_checkpoint)
    from dpo.config import ConfigError, TrainConfig

    accelerator = Accelerator(cpu=True)
    assert accelerator.is_local_main_process
    out = Path(base) / ("shared" if shared else f"node{rank}")
    torch.manual_seed(0)
    model = accelerator.prepare(torch.nn.Linear(4, 2))
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=0.1))
    assert detect_shared_output_dir(accelerator, out) is shared
    for step in (1, 2, 3):
        model(torch.ones(3, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        save_checkpoint(accelerator, out, step, {"step": step}, total_limit=2)

    # Every node's copy is complete (its own processes' RNG states) and pruned.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    rng = [f"random_states_{r}.pkl" for r in ((0, 1) if shared else (rank,))]
    assert sorted(p.name for p in (out / "checkpoint-3").iterdir()) == sorted(
        ["model.safetensors", "optimizer.bin", STATE_FILE, *rng])
    assert json.loads((out / "checkpoint-3" / STATE_FILE).read_text()) == {"step": 3}

    # Each node resumes from its own files.
    cfg = TrainConfig(output_dir=str(out), resume_from_checkpoint="latest")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.module.weight.zero_()
    assert load_checkpoint(accelerator, agree_on_resume(accelerator, cfg)) == {"step": 3}
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    if not shared:  # rank 1's node loses its newest checkpoint, then all of them
        for lost, rank1_sees in (("checkpoint-3", "checkpoint-2"), ("checkpoint-2", "none")):
            accelerator.wait_for_everyone()
            if rank == 1:
                shutil.rmtree(out / lost)
            accelerator.wait_for_everyone()
            with pytest.raises(ConfigError) as refused:
                agree_on_resume(accelerator, cfg)
            assert (f"the processes do not find the same complete checkpoint in {out} "
                    f"(checkpoint-3 on rank 0; {rank1_sees} on rank 1)") in str(refused.value)
    results[rank] = "ok"


@pytest.mark.parallel
@pytest.mark.parametrize("shared", [False, True], ids=["node-local", "shared"])
def test_checkpoints_on_nodes_with_and_without_a_shared_filesystem(tmp_path, shared):
    """Two nodes (one process each): on node-local disks each node's local main process writes
    a complete `checkpoint-<step>` (model, optimizer, trainer_state.json, its RNG states), prunes
    old ones and resumes from them; `latest` must be the same step on every node, else every
    process fails naming what each rank sees. On a shared filesystem rank 0 alone finalises."""
    results = mp.Manager().dict()
    mp.spawn(_node_worker, args=(free_port(), str(tmp_path), shared, results), nprocs=2)
    assert dict(results) == {0: "ok", 1: "ok"}


def _two_nodes(env, nodes, *flags):
    """train.py on two "machines" of one process each on 127.0.0.1, each started in its own
    directory with a relative --output-dir: two output directories, as on node-local disks."""
    port = str(free_port())
    procs = [subprocess.Popen(
        [*ACCELERATE, "--config_file", str(ROOT / "configs/accelerate/multinode.yaml"),
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision",
         "no", str(ROOT / "train.py"), *RUN, "--batch-size", "1", "--max-steps", "2",
         "--output-dir", "out", *flags],
        cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank, node in enumerate(nodes)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    return [proc.returncode for proc in procs], logs


@pytest.mark.parallel
def test_two_nodes_without_a_shared_filesystem(env, tmp_path):
    """Each node keeps complete checkpoints in its own output directory; `latest` on nodes that
    disagree fails on both with one line naming what each rank sees; once they agree, each
    resumes from its own files."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    codes, logs = _two_nodes(env, nodes)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for node in nodes:
        assert [p.name for p in checkpoints(node / "out")] == ["checkpoint-1", "checkpoint-2"]
        assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= {
            p.name for p in (node / "out" / "checkpoint-2").iterdir()}
    assert "is not shared by all nodes; each node keeps complete checkpoints" in logs[0]

    shutil.rmtree(nodes[1] / "out" / "checkpoint-2")
    codes, logs = _two_nodes(env, nodes, "--resume-from-checkpoint", "latest")
    assert 0 not in codes
    for log in logs:
        assert ("error: resume_from_checkpoint latest: the processes do not find the same "
                "complete checkpoint in out (checkpoint-2 on rank 0; checkpoint-1 on rank 1); "
                "every node must hold it") in log

    shutil.rmtree(nodes[0] / "out" / "checkpoint-2")
    codes, logs = _two_nodes(env, nodes, "--resume-from-checkpoint", "latest")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for node in nodes:
        assert [p.name for p in checkpoints(node / "out")] == ["checkpoint-1", "checkpoint-2"]
    assert [log["step"] for log in train_logs(nodes[0] / "out")] == [1, 2]


def test_a_resume_inherits_what_start_up_decided(tmp_path):
    """A checkpoint holds the settled padding_free; a resume that leaves it unset takes that
    choice and reports no change, while one that sets the other value is told it changed."""
    import dataclasses

    from dpo.train.checkpoint import (STATE_FILE, check_resume, inherit_start_up_choices,
                                settled_changes)
    from dpo.config import TrainConfig

    for settled in (True, False):
        saved = {**dataclasses.asdict(TrainConfig(padding_free=settled)), "num_processes": 1}
        (tmp_path / STATE_FILE).write_text(json.dumps({"step": 1, "config": saved}))
        unset = TrainConfig()
        assert check_resume(tmp_path, unset, num_processes=1) == []
        assert inherit_start_up_choices(tmp_path, unset).padding_free is settled
        other = TrainConfig(padding_free=not settled)
        assert check_resume(tmp_path, other, num_processes=1) == []
        assert inherit_start_up_choices(tmp_path, other).padding_free is not settled
        assert settled_changes(tmp_path, other) == ["padding_free"]


def test_a_resume_compares_every_setting_start_up_settles_as_settled(tmp_path):
    """A mixture of experts' run settled router_aux_loss_coef (None -> its config's 0.02) and
    turned chunked_logps off (a head the chunked path cannot serve). A resume that leaves both
    as they were given inherits the coefficient, settles chunked_logps off again, and is told
    of no change; a real change of either is named once settled."""
    import dataclasses

    from dpo.train.checkpoint import (STATE_FILE, check_resume, inherit_start_up_choices,
                                settled_changes)
    from dpo.config import TrainConfig

    ran = TrainConfig(router_aux_loss_coef=0.02, chunked_logps=False, padding_free=False)
    saved = {**dataclasses.asdict(ran), "num_processes": 1}
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 1, "config": saved}))

    def resume(given: TrainConfig, chunked_settles_to: bool) -> list[str]:
        changed = check_resume(tmp_path, given, num_processes=1)
        inherited = inherit_start_up_choices(tmp_path, given)
        settled = dataclasses.replace(  # as settle_logps_path would leave it
            inherited, chunked_logps=inherited.chunked_logps and chunked_settles_to)
        return changed + settled_changes(tmp_path, settled)

    assert resume(TrainConfig(), chunked_settles_to=False) == []
    assert inherit_start_up_choices(tmp_path, TrainConfig()).router_aux_loss_coef == 0.02
    assert resume(TrainConfig(router_aux_loss_coef=0.0), chunked_settles_to=False) == [
        "router_aux_loss_coef"]
    assert resume(TrainConfig(), chunked_settles_to=True) == ["chunked_logps"]


def test_a_mixture_of_experts_resumes_with_its_settled_router_loss(tmp_path):
    """train.py on a tiny Qwen3-MoE, whose router_aux_loss_coef start-up settles (0.02, from
    its config); the resume leaves it unset and is warned of the one real change only."""
    from transformers import AutoTokenizer

    from dpo.demo import build_demo_model
    from tests.test_forward import _tiny_moe

    env = demo_env(tmp_path / "cache")
    model_dir, out = tmp_path / "tiny-moe", tmp_path / "out"
    shutil.copytree(build_demo_model(tmp_path / "cache" / "demo"), model_dir)
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    _tiny_moe("qwen3_moe", vocab=len(AutoTokenizer.from_pretrained(model_dir))).save_pretrained(
        model_dir)
    run = ["--model", str(model_dir), "--dataset", "builtin:demo-preferences", "--num-samples",
           "8", "--eval-samples", "0", "--max-length", "48", "--batch-size", "2",
           "--save-steps", "1", "--seed", "3", "--output-dir", str(out)]
    run_train(env, *run, "--max-steps", "1")
    assert json.loads((checkpoints(out)[-1] / "trainer_state.json").read_text())[
        "config"]["router_aux_loss_coef"] == 0.02
    result = run_train(env, *run, "--max-steps", "2", "--resume-from-checkpoint", "latest")
    assert "warning: resuming with changed settings: max_steps\n" in result.stdout


def test_sigkill_then_resume_is_exact_with_rankings(env, tmp_path):
    """Rankings (a JSONL file built from the demo pairs by `tests.test_train.ranked_rows`: 3
    responses each, every third row cut to its best two, so batches mix N = 3 and N = 2), the
    all-pairs loss: a killed run resumes bit-identical."""
    from dpo.demo.build import demo_pairs
    from tests.test_train import _write_jsonl, ranked_rows

    rows = ranked_rows(demo_pairs()[0][:60])
    for row in rows[::3]:
        keep = [i for i, rank in enumerate(row["ranks"]) if rank < 3]
        row["responses"], row["ranks"] = ([row["responses"][i] for i in keep],
                                          [row["ranks"][i] for i in keep])
    data = _write_jsonl(tmp_path / "ranked.jsonl", rows)
    kill_and_resume(env, tmp_path, ["--dataset", str(data), "--ranking-loss", "all_pairs"],
                    KILL_STEPS[1])
