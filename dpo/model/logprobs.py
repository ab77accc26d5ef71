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
    token_logps, mask = _token_logps(logits, labels, ignore_index)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def _token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T-1]` log π(label_t) (float32) and the mask of counted positions, after the shift."""
    # Causal shift: the logits at position t predict the token at t+1.
    logits = logits[:, :-1, :]  # [B, T-1, V]
    labels = labels[:, 1:]  # [B, T-1]
    # Upcast before the log-softmax: in bf16 the normaliser over 10⁵ logits loses ~3 digits, and
    # summing hundreds of per-token log-probs would add that error up.
    token_logps = torch.log_softmax(logits.float(), dim=-1)
    token_logps = token_logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return token_logps, labels != ignore_index


@dataclass
class ResponseSums:
    """Per-sequence sums over the response tokens, each `(B,)`, from either path."""

    logps: torch.Tensor  # Σ_t log π(y_t), float32, with gradient
    counts: torch.Tensor  # number of tokens summed
    logits_sums: torch.Tensor  # Σ_t Σ_v logit_v (detached; the `logits/*` metrics)
    # Σ over the tokens marked `excess` of log π(y_t), with gradient (LD-DPO); None if not asked
    excess_logps: torch.Tensor | None = None
    # Σ_t (log π(y_t) − log Σ_v π(v)²), detached (WPO's weight); None if not asked
    wpo_sums: torch.Tensor | None = None


def response_sums(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  *, excess: torch.Tensor | None = None, weighting: bool = False
                  ) -> ResponseSums:
    """`sequence_logps` and the other sums the losses may read, from the full logits.

    Args:
        logits, labels: as for `sequence_logps`.
        excess: `[B, T]` bool aligned with `labels`: the response tokens whose log-probs are
            also summed apart, into `excess_logps` (LD-DPO's tokens past the shorter response).
        weighting: also sum log π(y_t) − log Σ_v π(v)² into `wpo_sums` (WPO), with
            log Σ_v π(v)² = logsumexp(2·z) − 2·logsumexp(z) of the logits z.
    """
    token_logps, mask = _token_logps(logits, labels, ignore_index)  # [B, T-1] each
    with torch.no_grad():
        z = logits[:, :-1].detach().float()  # [B, T-1, V]
        logits_sums = (z * mask.unsqueeze(-1)).sum((1, 2))
        wpo_sums = None
        if weighting:
            log_square_sum = torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)
            wpo_sums = ((token_logps.detach() - log_square_sum) * mask).sum(-1)
    return ResponseSums(
        (token_logps * mask).sum(-1), mask.sum(-1), logits_sums,
        excess_logps=None if excess is None else (token_logps * (excess[:, 1:] & mask)).sum(-1),
        wpo_sums=wpo_sums)


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
    sums = chunked_response_sums(hidden_states, lm_head, labels, ignore_index, chunk_size,
                                 logits_transform)
    return sums.logps, sums.counts, sums.logits_sums


def chunked_response_sums(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 256,
    logits_transform: LogitsTransform | None = None,
    *,
    excess: torch.Tensor | None = None,
    weighting: bool = False,
) -> ResponseSums:
    """`response_sums` on the chunked path (arguments as for `chunked_sequence_logps`), in the
    same one pass over the chunks: WPO's logsumexp(2·z) is taken beside the normaliser, only
    when `weighting`; the `excess` tokens are the same per-token log-probs, summed apart."""
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

    token_logps, token_logit_sums, log_square_sums = _call_as_forward(
        lm_head, _chunked_head, hidden, targets, chunk_size, logits_transform, weighting)
    zeros = hidden_states.new_zeros(batch_size, dtype=torch.float32)
    sums = ResponseSums(zeros.index_add(0, rows, token_logps), mask.sum(-1),
                        zeros.index_add(0, rows, token_logit_sums).detach())  # (B,) each
    if excess is not None:
        sums.excess_logps = zeros.index_add(0, rows, token_logps * excess[:, 1:][mask])
    if weighting:
        sums.wpo_sums = zeros.index_add(0, rows, token_logps.detach() - log_square_sums)
    return sums


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
                  chunk_size: int, transform: LogitsTransform | None, weighting: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log π(target), Σ_v logit_v and (with `weighting`, else None) log Σ_v π(v)² of every
    response position, a chunk at a time: `[N, H]` → `(N,), (N,), (N,)`."""
    token_logps, token_logit_sums, log_square_sums = [], [], []
    # At least one chunk, empty if need be: the output then always depends on the head, so that
    # its backward hooks run on every process (ZeRO-3 gathers there).
    for start in range(0, max(targets.shape[0], 1), chunk_size):
        # Checkpointing drops the [chunk, V] logits after the forward and recomputes them in the
        # backward, so at most one chunk's logits are alive at any time. `stats` carries the
        # forward's normaliser and logit sums ([chunk] floats) over to the recomputation.
        stats = {}
        logp, logit_sum = checkpoint(_chunk_logps, lm_head.weight, lm_head.bias,
                                     hidden[start:start + chunk_size],
                                     targets[start:start + chunk_size], stats, transform,
                                     weighting, use_reentrant=False)
        token_logps.append(logp)
        token_logit_sums.append(logit_sum)
        if weighting:
            log_square_sums.append(stats["log_square_sum"])
    return (torch.cat(token_logps), torch.cat(token_logit_sums).detach(),
            torch.cat(log_square_sums) if weighting else None)


def _chunk_logps(
    weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor,
    targets: torch.Tensor, stats: dict, transform: LogitsTransform | None,
    weighting: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(target) and Σ_v logit_v for each of a chunk of positions: `[n, H]` → `(n,), (n,)`.

    Called twice per chunk under checkpointing: in the forward, and again in the backward to
    rebuild the logits. The second call needs only the matmul: the logsumexp and the logit sums,
    each a full pass over `[n, V]`, are taken from `stats`, filled by the first call. With
    `weighting` the first call also leaves WPO's log Σ_v π(v)² = logsumexp(2·z) − 2·logsumexp(z)
    there (detached: the weight carries no gradient).
    """
    # fp32 for the normaliser, as in sequence_logps
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # [n, V]
    if transform is not None:  # autograd carries the gradient back through it to the head
        logits = transform(logits)
    if not stats:
        z = logits.detach()
        stats["lse"] = torch.logsumexp(z, dim=-1)  # [n]
        stats["logit_sums"] = z.sum(-1)  # [n]
        if weighting:
            stats["log_square_sum"] = torch.logsumexp(2 * z, dim=-1) - 2 * stats["lse"]
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
        else is caught by `dpo.model.probes.check_chunked_head`'s probe.
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
