"""Summed log-probs of response tokens: log π(y|x) = Σ_t log π(y_t | x, y_<t).

Two paths compute the same numbers:

- `sequence_logps` takes the model's logits `[B, T, V]`: simple, and what every reader expects.
- `chunked_sequence_logps` takes the final hidden states `[B, T, H]` and the LM head, and projects
  only the response positions onto the vocabulary, a chunk of tokens at a time, recomputing each
  chunk in the backward pass. A `[B, T, V]` fp32 logits tensor never exists: at Qwen3's vocab of
  151,669, batch 2×2 and 1024 tokens that tensor alone would be 2.5 GB, its gradient as much again.
  It also skips the LM head on prompt and padding positions, which the loss never reads.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sequence_logps` from the final hidden states, without materialising the logits.

    Args:
        hidden_states: `[B, T, H]` output of the model's last layer (after its final norm), i.e.
            what the LM head is applied to.
        lm_head: the model's output projection module. It is *called* (not its weight read) so
            that DeepSpeed ZeRO-3's hooks gather its sharded weight, also when recomputed.
        labels: `[B, T]` as for `sequence_logps`.
        chunk_size: response tokens per LM-head call; peak extra memory is ~2·chunk_size·V floats.

    Returns:
        `(logps, counts, logits_sums)`, each `(B,)`: summed log-probs (float32, with gradient),
        token counts, and the sum over tokens and vocabulary of the logits (detached; for the
        `logits/*` metrics).
    """
    batch_size = labels.shape[0]
    labels = labels[:, 1:]  # causal shift, as in sequence_logps
    mask = labels != ignore_index  # [B, T-1]
    # Keep only response positions: [N, H] with N = number of response tokens in the batch.
    # (Boolean indexing syncs with the device once per forward; it pays for itself by skipping
    # the LM head on every prompt and padding position.)
    hidden = hidden_states[:, :-1, :][mask]  # [N, H]
    targets = labels[mask]  # [N]
    rows = mask.nonzero()[:, 0]  # [N] which sequence each token belongs to

    token_logps, token_logit_sums = [], []
    num_chunks = agreed_num_chunks(lm_head, math.ceil(targets.shape[0] / chunk_size))
    for start in range(0, num_chunks * chunk_size, chunk_size):
        h = hidden[start:start + chunk_size]  # empty on a rank past its own last token
        t = targets[start:start + chunk_size]
        # Checkpointing drops the [chunk, V] logits after the forward and recomputes them in the
        # backward, so at most one chunk's logits are alive at any time. `stats` carries the
        # forward's normaliser and logit sums ([chunk] floats) over to the recomputation.
        logp, logit_sum = checkpoint(_chunk_logps, lm_head, h, t, {}, use_reentrant=False)
        token_logps.append(logp)
        token_logit_sums.append(logit_sum)

    zeros = hidden_states.new_zeros(batch_size, dtype=torch.float32)
    if not token_logps:  # no response token at all (every label ignored)
        return zeros, mask.sum(-1), zeros.detach()
    logps = zeros.index_add(0, rows, torch.cat(token_logps))  # (B,)
    logits_sums = zeros.index_add(0, rows, torch.cat(token_logit_sums)).detach()  # (B,)
    return logps, mask.sum(-1), logits_sums


def agreed_num_chunks(lm_head: nn.Module, num_chunks: int) -> int:
    """The number of LM-head calls every process makes: its own, or, when the head's weight is
    sharded by DeepSpeed ZeRO-3, the largest over the processes that share it.

    Under ZeRO-3 each call of the head all-gathers its weight, a collective that every process
    of its group must join. The number of response tokens, hence of chunks, differs between
    processes, so a process with fewer chunks would leave the others waiting forever, in the
    forward and again in the backward's recomputation. Processes short of chunks call the head
    on empty chunks instead (which add nothing). One all-reduce of an int per forward.
    """
    weight = next(lm_head.parameters(), None)
    group = getattr(weight, "ds_process_group", None)  # set on ZeRO-3 partitioned parameters
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return num_chunks
    count = torch.tensor(num_chunks, device=weight.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return int(count)


def _chunk_logps(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, stats: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(target) and Σ_v logit_v for each of a chunk of positions: `[n, H]` → `(n,), (n,)`.

    Called twice per chunk under checkpointing: in the forward, and again in the backward to
    rebuild the logits. The second call needs only the matmul: the logsumexp and the logit sums,
    each a full pass over `[n, V]`, are taken from `stats`, filled by the first call.
    """
    logits = lm_head(hidden).float()  # [n, V]; fp32 for the normaliser, as in sequence_logps
    if not stats:
        stats["lse"] = torch.logsumexp(logits.detach(), dim=-1)  # [n]
        stats["logit_sums"] = logits.detach().sum(-1)  # [n]
    return _TokenLogps.apply(logits, targets, stats["lse"]), stats["logit_sums"]


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
