"""Preemption (SIGTERM/SIGINT) and the non-finite loss/gradient guard: the guard's decisions
in-process (with a real GradScaler on CPU), then both on real processes."""
import math
import re
import signal

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from dpo.train.checkpoint import checkpoints
from dpo.train.safety import MIN_LOSS_SCALE, NonFiniteError, NonFiniteGuard
from tests.e2e import ACCELERATE, demo_env, free_port, run_train, train_logs, weights_equal
from tests.test_checkpoint import RUN, start, wait_for

# --- The guard under a loss scaler, as train.py drives it -------------------------------------
#
# accelerate gives fp16 runs a GradScaler on GPUs only; here a real torch.amp.GradScaler("cpu")
# is attached to a CPU Accelerator before `prepare`, so the optimizer is accelerate's own
# AcceleratedOptimizer, whose step() runs the scaler's step() and update() as on a GPU.
# `clip_grad_norm_` unscales through `unscale_gradients`, which on CPU is a no-op: the loop
# calls `scaler.unscale_` itself, as that method does under fp16.


def scaled_setup(init_scale: float | None, skip: bool = False):
    accelerator = Accelerator(cpu=True)
    if init_scale is not None:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1e-3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, NonFiniteGuard(accelerator, skip)


def loop_step(accelerator, model, optimizer, guard, x, step, loss_fn=lambda out: out.square()):
    """train.py's step: add_loss, check_loss, backward, clip (unscale), check, step if allowed."""
    at = dict(step=step, epoch=0, batches=range(step, step + 1))
    loss = loss_fn(model(x)).sum()
    guard.add_loss(loss)
    guard.check_loss(**at)
    accelerator.backward(loss)
    if accelerator.scaler is not None:
        accelerator.scaler.unscale_(optimizer.optimizer)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), math.inf)
    update = guard.check(grad_norm, **at)
    if update:
        optimizer.step()
    optimizer.zero_grad()
    return update


# out = 1e-3 · 1000 = 1, loss 1; the weight's gradient 2·out·1000 = 2000 times the scale.
X = torch.tensor([[1000.0, 0.0, 0.0, 0.0]])
NAN_X = torch.full((1, 4), math.nan)


def test_overflow_the_scaler_absorbs_is_not_fatal():
    """Scale 2¹²⁰: the scaled loss (1.3e36) is finite, its gradient (2.7e39) overflows fp32. The
    scaler skips such steps and halves its scale until the gradient fits (2¹¹⁶): the run goes
    on, the skipped updates are counted, then the weights move."""
    accelerator, model, optimizer, guard = scaled_setup(2.0 ** 120)
    before = model.weight.detach().clone()
    assert loop_step(accelerator, model, optimizer, guard, X, 1)  # optimizer.step() must run
    assert accelerator.optimizer_step_was_skipped
    assert torch.equal(model.weight, before)
    for step in range(2, 9):
        loop_step(accelerator, model, optimizer, guard, X, step)
    assert not accelerator.optimizer_step_was_skipped
    assert 2 <= guard.skipped < 8
    assert accelerator.scaler.get_scale() == 2.0 ** (120 - guard.skipped)
    assert torch.isfinite(model.weight).all() and not torch.equal(model.weight, before)


def test_skipping_a_nan_loss_still_updates_the_scaler():
    """--skip-nonfinite-steps under fp16: the guard drops the step, so accelerate's
    `optimizer.step()` (scaler.step + update) does not run; the guard runs the update itself,
    else the next step's unscale_() raises "unscale_() has already been called"."""
    accelerator, model, optimizer, guard = scaled_setup(2.0 ** 10, skip=True)
    before = model.weight.detach().clone()
    assert not loop_step(accelerator, model, optimizer, guard, NAN_X, 1)
    assert guard.skipped == 1 and torch.equal(model.weight, before)
    assert loop_step(accelerator, model, optimizer, guard, X, 2)
    assert not accelerator.optimizer_step_was_skipped
    assert accelerator.scaler.get_scale() == 2.0 ** 9  # step 1's NaN gradient lowered it
    assert torch.isfinite(model.weight).all() and not torch.equal(model.weight, before)


@pytest.mark.parametrize("init_scale", [2.0 ** 10, None])
def test_a_nan_loss_stops_with_or_without_a_scaler(init_scale):
    accelerator, model, optimizer, guard = scaled_setup(init_scale)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at optimizer step 3 "
                                             r"\(epoch 0, micro-batches 3-3"):
        loop_step(accelerator, model, optimizer, guard, NAN_X, 3)


def sqrt_of_square(out):
    """|out| at out = 0: a finite loss (0) whose gradient is NaN (d√u/du = ∞, times 0)."""
    return out.square().sqrt()


@pytest.mark.parametrize("init_scale", [MIN_LOSS_SCALE / 2, None])
def test_a_nan_gradient_stops_without_a_usable_loss_scale(init_scale):
    """A non-finite gradient with a finite loss is ours to stop on when no scaler can absorb it:
    no scaler at all (fp32, bf16), or a scale already below DeepSpeed's minimum of 1 (lowering it
    forever would silently stop training)."""
    accelerator, model, optimizer, guard = scaled_setup(init_scale)
    with torch.no_grad():
        model.weight.zero_()
    with pytest.raises(NonFiniteError, match="non-finite gradient .finite loss. at optimizer "
                                             "step 1"):
        loop_step(accelerator, model, optimizer, guard, X, 1, loss_fn=sqrt_of_square)


def deepspeed_guard(monkeypatch, fp16: bool, step_was_skipped: bool):
    """A guard that decides as under DeepSpeed (fp16 or not) after the engine stepped: fp16 does
    not run on CPU, so the engine's verdict is set instead of produced."""
    accelerator, model, optimizer, guard = scaled_setup(None)
    guard.deepspeed, guard.deepspeed_fp16 = True, fp16
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped",
                        property(lambda self: step_was_skipped))
    return guard


AT = dict(step=4, epoch=1, batches=range(7, 9))


def test_deepspeed_fp16_overflow_skip_is_not_fatal(monkeypatch):
    guard = deepspeed_guard(monkeypatch, fp16=True, step_was_skipped=True)
    guard.add_loss(torch.tensor(0.7))
    guard.check_loss(**AT)
    assert guard.check(math.inf, **AT) and guard.skipped == 1


@pytest.mark.parametrize("fp16, step_was_skipped", [(True, False), (False, True)])
def test_deepspeed_other_nonfinite_gradients_stop(monkeypatch, fp16, step_was_skipped):
    """Not an fp16 overflow skip: a non-finite gradient DeepSpeed applied, or one it discarded
    without a loss scale to blame (fp32, bf16)."""
    guard = deepspeed_guard(monkeypatch, fp16, step_was_skipped)
    with pytest.raises(NonFiniteError, match="non-finite gradient .finite loss. at optimizer "
                                             r"step 4 \(epoch 1, micro-batches 7-8"):
        guard.check(math.inf, **AT)


def test_deepspeed_checks_the_losses_before_backward(monkeypatch):
    """DeepSpeed steps inside the boundary's backward: a NaN in any micro-batch of the step stops
    the run before it, and the message does not offer --skip-nonfinite-steps (refused there)."""
    guard = deepspeed_guard(monkeypatch, fp16=True, step_was_skipped=True)
    guard.add_loss(torch.tensor(math.nan))  # the first micro-batch of the step
    guard.add_loss(torch.tensor(0.7))
    with pytest.raises(NonFiniteError, match="before DeepSpeed's step") as error:
        guard.check_loss(**AT)
    assert "--skip-nonfinite-steps" not in str(error.value)


def test_without_deepspeed_the_losses_wait_for_check():
    """One host sync per step: `check_loss` is a no-op outside DeepSpeed, `check` sees the loss."""
    accelerator, model, optimizer, guard = scaled_setup(None)
    guard.add_loss(torch.tensor(math.nan))
    guard.check_loss(**AT)
    with pytest.raises(NonFiniteError, match="non-finite loss at optimizer step 4"):
        guard.check(1.0, **AT)


# --- On real processes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return demo_env(tmp_path_factory.mktemp("dpo_cache"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_exits_zero_and_resumes_exactly(env, tmp_path, sig):
    """The run finishes its optimizer step, saves `checkpoint-<step>` (also between
    --save-steps), exits 0; the resume ends where an uninterrupted run does."""
    flags = ["--save-steps", "1000"]  # no periodic checkpoint: the signal's is the only one
    out = tmp_path / "out"
    proc = start(env, out, *flags)
    wait_for(proc, "step 5:")
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0
    text = "".join(proc.lines)
    match = re.search(rf"{sig.name}: saved checkpoint-(\d+) in [\d.]+s", text)
    assert match, text[-2000:]
    assert [p.name for p in checkpoints(out)] == [f"checkpoint-{match.group(1)}"]
    assert not (out / "model.safetensors").exists()  # stopped early: no "finished" model

    run_train(env, *RUN, *flags, "--output-dir", str(out), "--resume-from-checkpoint", "latest")
    reference = tmp_path / "reference"
    run_train(env, *RUN, *flags, "--output-dir", str(reference))
    assert weights_equal(out, reference)
    assert [log["step"] for log in train_logs(out)] == list(range(1, 17))


@pytest.mark.slow
def test_nan_stops_with_one_line_and_saves_nothing_bad(env, tmp_path):
    """A learning rate of 1e30 makes step 1's update ±1e30 per weight; step 2's forward then
    overflows to Inf/NaN. The run stops before that step updates anything, naming the step and
    its micro-batches; every checkpoint holds finite weights only."""
    out = tmp_path / "out"
    result = run_train(env, *RUN, "--learning-rate", "1e30", "--output-dir", str(out),
                       check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "non-finite loss at optimizer step 2" in line and "micro-batches" in line
    assert "--skip-nonfinite-steps" in line
    assert not (out / "model.safetensors").exists()
    for ckpt in checkpoints(out):
        for tensor in load_file(ckpt / "model.safetensors").values():
            assert torch.isfinite(tensor).all()


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parallel
def test_deepspeed_nan_loss_stops_before_its_step(env, tmp_path):
    """Under DeepSpeed (ZeRO-2, which steps inside backward) step 2's NaN loss is caught before
    that backward, with one line that does not offer --skip-nonfinite-steps."""
    out = tmp_path / "out"
    launcher = [*ACCELERATE, "--use_deepspeed", "--zero_stage", "2", "--num_processes", "1",
                "--main_process_port", str(free_port())]
    result = run_train(env, *RUN, "--learning-rate", "1e30", "--output-dir", str(out),
                       launcher=launcher, check=False)
    assert result.returncode != 0  # (the launcher adds its own traceback)
    line = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert line.startswith("error: non-finite loss at optimizer step 2 (epoch 0, micro-batches")
    assert "found before DeepSpeed's step" in line and "--skip-nonfinite-steps" not in line
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "model.safetensors").exists()
