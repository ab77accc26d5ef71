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


class NonFiniteGuard:
    """Watches losses (per micro-batch, on the device) and the gradient norm (per step).

    `check` runs before `optimizer.step()`, so a NaN or Inf never reaches the weights: the run
    stops with a message naming the step and micro-batches, or — with `skip` — drops that step's
    gradients and counts it (`skipped_steps` in the metrics).
    """

    def __init__(self, accelerator: Accelerator, skip: bool):
        self.accelerator = accelerator
        self.skip = skip
        self.bad_loss = torch.zeros((), device=accelerator.device)
        self.skipped = 0

    def add_loss(self, loss: torch.Tensor) -> None:
        self.bad_loss += (~torch.isfinite(loss.detach())).float()  # no host sync here

    def check(self, grad_norm: torch.Tensor | float | None, *, step: int, epoch: int,
              batches: range) -> bool:
        """True if this step may update the weights. Syncs with the device once per step."""
        bad = self.bad_loss.clone()
        if grad_norm is not None:
            bad += (~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        self.bad_loss.zero_()
        if not bad.item():
            return True
        where = (f"optimizer step {step} (epoch {epoch}, micro-batches "
                 f"{batches.start}-{batches.stop - 1} of the epoch)")
        if not self.skip:
            raise NonFiniteError(f"non-finite loss or gradient at {where}; nothing was saved "
                                 "from this step. Lower --learning-rate, check the data, or pass "
                                 "--skip-nonfinite-steps to skip such steps")
        self.skipped += 1
        self.accelerator.print(f"warning: skipped {where}: non-finite loss or gradient")
        return False
