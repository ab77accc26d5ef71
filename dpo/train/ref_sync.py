"""TR-DPO: a reference that follows the policy (Gorbatovski et al. 2024, arXiv:2404.09656).

DPO's reference is frozen at the starting policy. TR-DPO ("trust region" DPO) updates it every
`ref_model_sync_steps` optimizer steps, softly (α = `ref_model_mixup_alpha` < 1) or by a hard
copy (α = 1):

    θ_ref ← α·θ_π + (1 − α)·θ_ref

so the implicit reward β·log π/π_ref measures the policy against a recent version of itself and
the policy can move further from where it started than a fixed reference lets it.
"""
from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dpo.config import ConfigError, TrainConfig


class ReferenceSync:
    """Moves the reference towards the policy at every `ref_model_sync_steps`-th optimizer step.

    Works on the layouts the reference can take (`dpo.model.loading.prepare_reference`): a
    replica in every process (one process, DDP, ZeRO-1/2: each process updates its copy from its policy,
    which DDP and DeepSpeed keep identical) and a ZeRO-3 engine, whose shards are gathered one
    parameter pair at a time, updated on rank 0 and scattered back. Its `state_dict` is the
    reference's weights, so a checkpoint (`accelerator.register_for_checkpointing`) holds the
    synced reference and a resume continues with it.
    """

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, policy, reference):
        self.accelerator, self.alpha = accelerator, cfg.ref_model_mixup_alpha
        self.every = cfg.ref_model_sync_steps
        state = accelerator.state
        self.zero3 = (state.distributed_type == DistributedType.DEEPSPEED
                      and state.deepspeed_plugin.zero_stage == 3)
        policy_module = accelerator.unwrap_model(policy)
        reference_module = getattr(reference, "module", reference)  # a ZeRO-3 engine's model
        ref_params = dict(reference_module.named_parameters())
        policy_params = dict(policy_module.named_parameters())
        shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in ref_params.items()}
        if shapes != {name: tuple(getattr(p, "ds_shape", p.shape))
                      for name, p in policy_params.items()}:
            raise ConfigError("sync_ref_model: the reference (--ref-model) is not the policy's "
                              "architecture, so it cannot take the policy's weights; drop one")
        self.pairs = [(name, ref_params[name], param) for name, param in policy_params.items()]

    @torch.no_grad()
    def end_step(self, step: int) -> None:
        """Sync if `step` (counted from 1) is a sync step. Every process must call it."""
        if step % self.every:
            return
        for _, ref, pol in self.pairs:
            with self._gathered(ref, pol) as modify:
                if modify:
                    ref.data.lerp_(pol.data.to(ref.dtype), self.alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference's full weights on the process(es) that write checkpoints; {} elsewhere.
        Under ZeRO-3 every process takes part in the gathers."""
        keep = self.accelerator.is_local_main_process
        state = {}
        with torch.no_grad():
            for name, ref, _ in self.pairs:
                with self._gathered(ref, modify=False):
                    if keep:
                        state[name] = ref.data.detach().to("cpu", copy=True)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, ref, _ in self.pairs:
            with self._gathered(ref) as modify:
                if modify:
                    ref.data.copy_(state[name].to(ref.device, ref.dtype))

    def _gathered(self, *params, modify: bool = True):
        """Under ZeRO-3, the full `params` for the block — with `modify`, written back from rank 0
        at its end; yields whether this process is the one whose writes count."""
        if not self.zero3:
            return contextlib.nullcontext(True)
        import deepspeed

        @contextlib.contextmanager
        def gather():
            with deepspeed.zero.GatheredParameters(list(params),
                                                   modifier_rank=0 if modify else None):
                yield self.accelerator.process_index == 0
        return gather()
