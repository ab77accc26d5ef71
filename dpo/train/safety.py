"""Stopping safely: preemption signals and non-finite losses or gradients.

Both are checked once per optimizer step, never per micro-batch, and decided the same way on every
process — a signal may reach only some of them, a NaN may appear in one process' shard only — so
that all processes save, skip or stop together instead of deadlocking in the next collective.
"""
from __future__ import annotations

import signal
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dpo.config import ConfigError


class StopRequest:
    """Turns SIGTERM/SIGINT into a request to stop at the next optimizer-step boundary.

    The handler only sets a flag: saving from inside a signal handler could interrupt a
    half-done optimizer step or collective. The loop finishes its step, saves a checkpoint and
    exits 0, so a preempted job resumes exactly with `--resume-from-checkpoint latest`.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.signal_name: str | None = None
        self.received_at: float | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.perf_counter()

    def requested(self) -> bool:
        """True on every process as soon as any process received a signal."""
        flag = torch.tensor(float(self.signal_name is not None), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item())


class NonFiniteError(ConfigError):
    """A non-finite loss or gradient norm: one line naming the step and the batch."""


# Below this loss scale an overflow is no longer the scale's fault (DeepSpeed's min_loss_scale).
MIN_LOSS_SCALE = 1.0


class NonFiniteGuard:
    """Watches the losses (per micro-batch, on the device) and the gradient norm (per step).

    A NaN or Inf never reaches the weights: the run stops with a message naming the step and its
    micro-batches, or — with `skip` — drops that step's update and counts it (`skipped_steps` in
    the metrics, which also counts the updates an fp16 loss scaler dropped). Where it looks:
    - one process, DDP: `check`, after backward and before `optimizer.step()`, sees the step's
      losses and its gradient norm.
    - fp16 with accelerate's GradScaler: a non-finite gradient with finite losses is the scaler's
      overflow, which `optimizer.step()` skips while lowering the scale: not ours to stop on,
      until the scale falls below `MIN_LOSS_SCALE`. A non-finite loss is ours; skipping its step,
      the guard still runs the scaler's `update()`, which `optimizer.step()` would have run.
    - DeepSpeed steps inside `accelerator.backward` at the accumulation boundary, so
      `check_loss` looks at the step's losses before that backward; `check` then sees the
      gradient norm DeepSpeed measured: its fp16 overflow skip is fine, any other non-finite
      gradient stops the run (DeepSpeed skipped it, unless bf16's `check_grad_overflow` is off).
      `skip` is refused there at start-up (`dpo.train.runtime`): the step cannot be undone.
    """

    def __init__(self, accelerator: Accelerator, skip: bool):
        self.accelerator = accelerator
        self.skip = skip
        self.bad_loss = torch.zeros((), device=accelerator.device)
        self.skipped = 0
        self.scaler = accelerator.scaler  # a GradScaler under fp16, except under DeepSpeed
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        # Only after `prepare`: the engine resolved DeepSpeed's fp16 mode and its loss scale.
        self.deepspeed_fp16 = (self.deepspeed and
                               accelerator.deepspeed_engine_wrapped.engine.fp16_enabled())

    def add_loss(self, loss: torch.Tensor) -> None:
        self.bad_loss += (~torch.isfinite(loss.detach())).float()  # no host sync here

    def check_loss(self, *, step: int, epoch: int, batches: range) -> None:
        """Under DeepSpeed, call before the `accelerator.backward` that ends the step: it steps
        there. Elsewhere a no-op, the losses are checked with the gradient norm in `check`."""
        if not self.deepspeed:
            return
        bad_loss, _ = self._reduce(None)
        if bad_loss:
            raise NonFiniteError(f"non-finite loss at {_where(step, epoch, batches)}, found "
                                 "before DeepSpeed's step; nothing was saved from this step. "
                                 "Lower --learning-rate or check the data")

    def check(self, grad_norm: torch.Tensor | float | None, *, step: int, epoch: int,
              batches: range) -> bool:
        """True if this step may update the weights. Syncs with the device once per step."""
        bad_loss, bad_grad = self._reduce(grad_norm)
        if not (bad_loss or bad_grad):
            return True
        if not bad_loss and self._loss_scaler_absorbs():
            self.skipped += 1
            return True
        what = "loss" if bad_loss else "gradient (finite loss)"
        where = _where(step, epoch, batches)
        if self.deepspeed:
            raise NonFiniteError(f"non-finite {what} at {where}; nothing was saved from this "
                                 "step. Lower --learning-rate or check the data")
        if not self.skip:
            raise NonFiniteError(f"non-finite {what} at {where}; nothing was saved from this "
                                 "step. Lower --learning-rate, check the data, or pass "
                                 "--skip-nonfinite-steps to skip such steps")
        if self.scaler is not None:
            # `clip_grad_norm_` unscaled the gradients: without the update that
            # `optimizer.step()` would have run, the next step's unscale_() raises.
            self.scaler.update()
        self.skipped += 1
        self.accelerator.print(f"warning: skipped {where}: non-finite {what}")
        return False

    def _reduce(self, grad_norm) -> tuple[bool, bool]:
        """(any process saw a non-finite loss, ... a non-finite gradient norm); resets losses."""
        bad = torch.stack([self.bad_loss, torch.zeros_like(self.bad_loss)])
        if grad_norm is not None:
            bad[1] = (~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        self.bad_loss.zero_()
        bad_loss, bad_grad = bad.tolist()
        return bool(bad_loss), bool(bad_grad)

    def _loss_scaler_absorbs(self) -> bool:
        """Whether a loss scaler drops this step's non-finite gradient and lowers its scale."""
        if self.scaler is not None:
            return self.scaler.get_scale() >= MIN_LOSS_SCALE
        # DeepSpeed's engine has already stepped; below its minimum scale it raises itself.
        return self.deepspeed_fp16 and self.accelerator.optimizer_step_was_skipped


def _where(step: int, epoch: int, batches: range) -> str:
    return (f"optimizer step {step} (epoch {epoch}, micro-batches "
            f"{batches.start}-{batches.stop - 1} of the epoch)")
