"""Preemption (SIGTERM/SIGINT) and the non-finite loss/gradient guard, on real processes."""
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from dpo.checkpoint import checkpoints
from tests.e2e import demo_env, run_train, train_logs, weights_equal
from tests.test_checkpoint import RUN, start, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return demo_env(tmp_path_factory.mktemp("dpo_cache"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_exits_zero_and_resumes_exactly(env, tmp_path, sig):
    """The run finishes its optimizer step, saves `checkpoint-<step>` (also between
    --save-steps), exits 0; the resume ends where an uninterrupted run does."""
    flags = ["--save-steps", "1000"]  # no periodic checkpoint: the signal's is the only one
    out = tmp_path / "out"
    proc, lines = start(env, out, *flags)
    wait_for(proc, lambda: any(line.startswith("step 5:") for line in lines))
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0
    text = "".join(lines)
    match = re.search(rf"{sig.name}: saved checkpoint-(\d+) in [\d.]+s", text)
    assert match, text[-2000:]
    assert [p.name for p in checkpoints(out)] == [f"checkpoint-{match.group(1)}"]
    assert not (out / "model.safetensors").exists()  # stopped early: no "finished" model

    run_train(env, *RUN, *flags, "--output-dir", str(out), "--resume-from-checkpoint", "latest")
    reference = tmp_path / "reference"
    run_train(env, *RUN, *flags, "--output-dir", str(reference))
    assert weights_equal(out, reference)
    assert [log["step"] for log in train_logs(out)] == list(range(1, 17))


def test_nan_stops_with_one_line_and_saves_nothing_bad(env, tmp_path):
    """A learning rate of 1e30 makes step 1's update ±1e30 per weight; step 2's forward then
    overflows to Inf/NaN. The run stops before that step updates anything, naming the step and
    its micro-batches; every checkpoint holds finite weights only."""
    out = tmp_path / "out"
    result = run_train(env, *RUN, "--learning-rate", "1e30", "--output-dir", str(out),
                       check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "non-finite loss or gradient at optimizer step 2" in line and "micro-batches" in line
    assert "--skip-nonfinite-steps" in line
    assert not (out / "model.safetensors").exists()
    for ckpt in checkpoints(out):
        for tensor in load_file(ckpt / "model.safetensors").values():
            assert torch.isfinite(tensor).all()


def test_skip_nonfinite_steps_counts_and_finishes(env, tmp_path):
    out = tmp_path / "out"
    run_train(env, *RUN, "--learning-rate", "1e30", "--skip-nonfinite-steps",
              "--output-dir", str(out))
    logs = train_logs(out)
    assert [log["step"] for log in logs] == list(range(1, 17))
    assert "skipped_steps" not in logs[0] and logs[-1]["skipped_steps"] == 15
    for tensor in load_file(out / "model.safetensors").values():
        assert torch.isfinite(tensor).all()
    # Every step after the first was skipped: the weights are still those of step 1.
    after_step_1 = load_file(out / "checkpoint-1" / "model.safetensors")
    final = load_file(out / "model.safetensors")
    assert final.keys() == after_step_1.keys()
    assert all(torch.equal(final[k], after_step_1[k]) for k in final)
