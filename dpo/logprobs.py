"""Summed log-probs of response tokens: log π(y|x) = Σ_t log π(y_t | x, y_<t).

Two paths compute the same numbers:

- `sequence_logps` takes the model's logits `[B, T, V]`: simple, and what every reader expects.
- `chunked_sequence_logps` takes the final hidden states `[B, T, H]` and the LM head, and projects
  only the response positions onto the vocabulary, a chunk of tokens at a time, recomputing each
  chunk in the backward pass. A `[B, T, V]` fp32 logits tensor never exists: at Qwen3's vocab of
  151,669, batch 2×2 and 1024 tokens that tensor alone would be 2.5 GB, its gradient as much again.
  It also skips the LM head on prompt and padding positions, which the loss never reads.
  Whatever a model does to `lm_head(h)` before returning its logits (Gemma-2's soft-capping,
  Cohere's and Granite's scaling) it must redo: `LogitsTransform`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log π(label_t) over the positions whose label is not `ignore_index`.

    Args:
        logits: `[B, T, V]` next-token logits, as returned by a causal LM.
        labels: `[B, T]` token ids aligned with the *inputs* (like HF's `labels`), with
            `ignore_index` on prompt and padding positions.

    Returns:
        `(logps, counts)`: `(B,)` float32 summed log-probs, and `(B,)` number of tokens summed.
    """
    # Causal shift: the logits at position t predict the token at t+1.
    logits = logits[:, :-1, :]  # [B, T-1, V]
    labels = labels[:, 1:]  # [B, T-1]
    mask = labels != ignore_index
    # Upcast before the log-softmax: in bf16 the normaliser over 10⁵ logits loses ~3 digits, and
    # summing hundreds of per-token log-probs would add that error up.
    token_logps = torch.log_softmax(logits.float(), dim=-1)
    token_logps = token_logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return (token_logps * mask).sum(-1), mask.sum(-1)


def chunked_sequence_logps(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 256,
    logits_transform: LogitsTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sequence_logps` from the final hidden states, without materialising the logits.

    Args:
        hidden_states: `[B, T, H]` output of the model's last layer (after its final norm), i.e.
            what the LM head is applied to.
        lm_head: the model's output projection, an `nn.Linear`. The chunks run inside one call
            of this module (see `_call_as_forward`), so that hooks on it run once per forward.
        labels: `[B, T]` as for `sequence_logps`.
        chunk_size: response tokens per chunk; peak extra memory is ~2·chunk_size·V floats.
        logits_transform: what the model applies to `lm_head`'s output to make its logits
            (`LogitsTransform.from_config`); None when it returns `lm_head`'s output as it is.

    Returns:
        `(logps, counts, logits_sums)`, each `(B,)`: summed log-probs (float32, with gradient),
        token counts, and the sum over tokens and vocabulary of the logits (detached; for the
        `logits/*` metrics).
    """
    if not isinstance(lm_head, nn.Linear):
        raise TypeError(f"the chunked head needs an nn.Linear LM head, got "
                        f"{type(lm_head).__name__}")
    batch_size = labels.shape[0]
    labels = labels[:, 1:]  # causal shift, as in sequence_logps
    mask = labels != ignore_index  # [B, T-1]
    # Keep only response positions: [N, H] with N = number of response tokens in the batch.
    # (Boolean indexing syncs with the device once per forward; it pays for itself by skipping
    # the LM head on every prompt and padding position.)
    hidden = hidden_states[:, :-1, :][mask]  # [N, H]
    targets = labels[mask]  # [N]
    rows = mask.nonzero()[:, 0]  # [N] which sequence each token belongs to

    token_logps, token_logit_sums = _call_as_forward(
        lm_head, _chunked_head, hidden, targets, chunk_size, logits_transform)  # (N,), (N,)
    zeros = hidden_states.new_zeros(batch_size, dtype=torch.float32)
    logps = zeros.index_add(0, rows, token_logps)  # (B,)
    logits_sums = zeros.index_add(0, rows, token_logit_sums).detach()  # (B,)
    return logps, mask.sum(-1), logits_sums


def _call_as_forward(module: nn.Module, function, *args):
    """`function(module, *args)`, run as one call of `module` (its forward for this call).

    Under DeepSpeed ZeRO-3 the LM head's weight is sharded, and hooks on the module all-gather
    it when the module is called (and again before its backward). Calling the head once per
    chunk would gather the whole vocabulary × hidden matrix once per chunk, forward and
    backward's recomputation alike (311 MB in bf16 for Qwen3-0.6B, each time), and as many
    times as the process has response tokens: processes with different lengths would make
    different numbers of these collective calls and wait for each other forever. Run as the
    module's forward, the whole chunk loop costs one gather for the forward and one for the
    backward, on every process alike; the hooks release the weight after each.
    """
    saved = module.__dict__.get("forward")
    module.forward = functools.partial(function, module)
    try:
        return module(*args)
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def _chunked_head(lm_head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                  chunk_size: int, transform: LogitsTransform | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(target) and Σ_v logit_v of every response position, a chunk at a time:
    `[N, H]` → `(N,), (N,)`."""
    token_logps, token_logit_sums = [], []
    # At least one chunk, empty if need be: the output then always depends on the head, so that
    # its backward hooks run on every process (ZeRO-3 gathers there).
    for start in range(0, max(targets.shape[0], 1), chunk_size):
        # Checkpointing drops the [chunk, V] logits after the forward and recomputes them in the
        # backward, so at most one chunk's logits are alive at any time. `stats` carries the
        # forward's normaliser and logit sums ([chunk] floats) over to the recomputation.
        logp, logit_sum = checkpoint(_chunk_logps, lm_head.weight, lm_head.bias,
                                     hidden[start:start + chunk_size],
                                     targets[start:start + chunk_size], {}, transform,
                                     use_reentrant=False)
        token_logps.append(logp)
        token_logit_sums.append(logit_sum)
    return torch.cat(token_logps), torch.cat(token_logit_sums).detach()


def _chunk_logps(
    weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor,
    targets: torch.Tensor, stats: dict, transform: LogitsTransform | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(target) and Σ_v logit_v for each of a chunk of positions: `[n, H]` → `(n,), (n,)`.

    Called twice per chunk under checkpointing: in the forward, and again in the backward to
    rebuild the logits. The second call needs only the matmul: the logsumexp and the logit sums,
    each a full pass over `[n, V]`, are taken from `stats`, filled by the first call.
    """
    # fp32 for the normaliser, as in sequence_logps
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # [n, V]
    if transform is not None:  # autograd carries the gradient back through it to the head
        logits = transform(logits)
    if not stats:
        stats["lse"] = torch.logsumexp(logits.detach(), dim=-1)  # [n]
        stats["logit_sums"] = logits.detach().sum(-1)  # [n]
    return _TokenLogps.apply(logits, targets, stats["lse"]), stats["logit_sums"]


@dataclass(frozen=True)
class LogitsTransform:
    """What a model does to `lm_head(h)` to make the logits it returns, read off its config:
    `softcap · tanh(z · multiply / divide / softcap)`. The model forward does this after its LM
    head, so a path that calls the head itself must redo it, or its log-probs are another
    model's (tens of nats off per sequence for Gemma-2).
    """

    multiply: float = 1.0  # Cohere: logits * config.logit_scale
    divide: float = 1.0  # Granite: logits / config.logits_scaling
    softcap: float | None = None  # Gemma-2/3: cap * tanh(logits / cap), final_logit_softcapping

    @classmethod
    def from_config(cls, config) -> LogitsTransform | None:
        """The transform that `config`'s fields call for; None for the plain `lm_head(h)`.

        Read by field name, so the model families that share these fields (Cohere-2, Granite
        MoE, VaultGemma, ...) are covered too; a model that names a field but does something
        else is caught by `dpo.forward.check_chunked_head`'s probe.
        """
        transform = cls(multiply=getattr(config, "logit_scale", None) or 1.0,
                        divide=getattr(config, "logits_scaling", None) or 1.0,
                        softcap=getattr(config, "final_logit_softcapping", None))
        return None if transform == cls() else transform

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        # The same operations in the same order as the models' forwards, so that fp32 results
        # agree to the last bits; the identity steps are skipped.
        if self.multiply != 1.0:
            logits = logits * self.multiply
        if self.divide != 1.0:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class _TokenLogps(torch.autograd.Function):
    """`logits[i, targets[i]] − lse[i]`, lse = logsumexp(logits, −1): `[n, V]` → `(n,)`, with a
    lean backward. `lse` is passed in (computed without gradient): it is a function of `logits`,
    whose gradient the backward below includes.

    Autograd's version of the same expression materialises four more `[n, V]` tensors in the
    backward (the softmax, its product with the gradient, the gather's zero-filled scatter and
    their sum); this one writes a single `[n, V]` gradient: ∂logp_i/∂logits_i = onehot(t_i) −
    softmax(logits_i). The chunk's backward is then bound by the LM-head matmuls (13% faster on
    CPU at V = 49,152, same gradients to the bit).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(logits, lse, targets)
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, lse, targets = ctx.saved_tensors
        # −g·softmax, computed in one buffer (not in place: `logits` may be saved elsewhere).
        grad_logits = (logits - lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))  # [n, V]
        rows = torch.arange(targets.shape[0], device=targets.device)
        grad_logits.index_put_((rows, targets), grad, accumulate=True)  # + g·onehot(target)
        return grad_logits, None, None
