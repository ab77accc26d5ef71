"""Training and eval metrics: per-pair statistics, summed on the device, reduced across processes.

Nothing here calls `.item()` per micro-batch: statistics are added to a device tensor and read
back once per log, so logging never stalls the GPU between steps.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from dpo.loss import is_unpaired
from dpo.loss.ranked import ranked_pairs
from dpo.loss.reference_free import log_odds_ratio
from dpo.train.step import StepOutput

# Per-pair statistics, in the column order of `pair_stats`.
PAIR_KEYS = (
    "loss",                # the per-pair loss: a mixture's weighted sum of its terms
    "rewards/chosen",      # β·(log π(y⁺) − log π_ref(y⁺))
    "rewards/rejected",    # β·(log π(y⁻) − log π_ref(y⁻))
    "rewards/accuracies",  # 1 where the chosen reward is strictly larger (rankings: the share
    "rewards/margins",     # of ordered pairs right), chosen − rejected (docs/dpo.md §13)
    "logps/chosen",        # summed log π(y⁺)
    "logps/rejected",
    "logits/chosen",       # mean logit over response tokens and vocabulary
    "logits/rejected",
)
# KTO's rows are unpaired: `chosen` statistics are the means over the desirable completions,
# `rejected` ones over the undesirable completions (TRL's names), `kl` its reference point z₀
# and `desirable` the share of desirable rows. `pair_stats` gives each row its value times its
# class indicator; `class_means` divides by the class's share.
UNPAIRED_KEYS = ("loss", "kl", "desirable", "rewards/chosen", "rewards/rejected", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected")


def pair_keys(cfg) -> tuple[str, ...]:
    """`PAIR_KEYS`; for a mixture of losses each term, unweighted, as `loss/<type>`; for a
    mixture of experts its router loss, unweighted, as `aux_loss`; with WPO the pairs' weights,
    as `weights/mean`; with ORPO, under TRL's names, its log odds ratio as `log_odds_chosen` and
    the log σ of it as `log_odds_ratio`."""
    types = cfg.loss_type
    if is_unpaired(types):  # KTO stands alone: no mixture terms, no WPO
        return UNPAIRED_KEYS + (("aux_loss",) if cfg.router_aux_loss_coef else ())
    return (PAIR_KEYS + (tuple(f"loss/{t}" for t in types) if len(types) > 1 else ())
            + (("aux_loss",) if cfg.router_aux_loss_coef else ())
            + (("weights/mean",) if cfg.use_weighting else ())
            + (("log_odds_chosen", "log_odds_ratio") if "orpo" in types else ()))


def pair_stats(out: StepOutput) -> torch.Tensor:
    """`[B, len(pair_keys(cfg))]` float32 statistics of each pair, detached."""
    chosen, rejected, policy = out.chosen_rewards, out.rejected_rewards, out.policy
    if out.labels is not None:  # each completion's own statistics, in its class's column
        desirable = out.labels.float()
        columns = [out.losses, out.kl.expand_as(out.losses), desirable]
        for value in (chosen, policy.chosen_logps, policy.chosen_logits_mean):
            columns += [value * desirable, value * (1 - desirable)]
    elif out.slot_rewards is not None:
        columns = ranking_columns(out)
    else:
        columns = [out.losses, chosen, rejected, chosen > rejected, chosen - rejected,
                   policy.chosen_logps, policy.rejected_logps, policy.chosen_logits_mean,
                   policy.rejected_logits_mean]
    if len(out.terms) > 1:
        columns += list(out.terms.values())
    if out.aux_loss is not None:  # one value per batch, the same for each of its pairs
        columns.append(out.aux_loss.expand_as(out.losses))
    if out.weights is not None:
        columns.append(out.weights)
    if "orpo" in out.terms:
        log_odds = log_odds_ratio(policy.chosen_logps / policy.chosen_lengths,
                                  policy.rejected_logps / policy.rejected_lengths)
        columns += [log_odds, F.logsigmoid(log_odds)]
    return torch.stack([c.detach().float() for c in columns], dim=1)  # (B, K)


def ranking_columns(out: StepOutput) -> list[torch.Tensor]:
    """`PAIR_KEYS`' columns of ranked rows: `chosen` the best response's value, `rejected` the
    mean over the others; `accuracies` the share, and `margins` the mean reward margin, of the
    pairs the data orders that the metrics compare (`ranked_pairs`: each response with the one
    ranked just above it, or with the best when only the best is known). N = 2: DPO's values."""
    mask, rewards, policy = out.ranking_mask, out.slot_rewards, out.policy
    better, compared = ranked_pairs(mask, out.stages)
    margins = rewards.gather(1, better) - rewards
    pairs = compared.sum(-1).clamp(min=1)

    def others(values: torch.Tensor) -> torch.Tensor:  # mean over slots 2..N
        return torch.where(mask[:, 1:], values[:, 1:], 0.0).sum(-1) / pairs

    correct = (margins > 0) & compared
    return [out.losses, rewards[:, 0], others(rewards), correct.sum(-1) / pairs,
            torch.where(compared, margins, 0.0).sum(-1) / pairs,
            policy.slot_logps[:, 0], others(policy.slot_logps),
            policy.slot_logits_mean[:, 0], others(policy.slot_logits_mean)]


def class_means(means: dict[str, float]) -> dict[str, float]:
    """Means over all rows as they are; for KTO's (`UNPAIRED_KEYS`, under any prefix), the class
    columns divided by their class's share: the means over that class's rows, and their margin.
    A class without rows in the logged interval has no statistics then."""
    shares = {key[:-len("desirable")]: share for key, share in means.items()
              if key.endswith("desirable")}
    if not shares:
        return means
    out = {}
    for key, value in means.items():
        prefix = max((p for p in shares if key.startswith(p)), key=len, default=None)
        if prefix is None or not key.endswith(("/chosen", "/rejected")):
            out[key] = value
            continue
        share = shares[prefix] if key.endswith("/chosen") else 1 - shares[prefix]
        if share > 0:
            out[key] = value / share
    for prefix in shares:
        if f"{prefix}rewards/chosen" in out and f"{prefix}rewards/rejected" in out:
            out[f"{prefix}rewards/margins"] = (out[f"{prefix}rewards/chosen"]
                                               - out[f"{prefix}rewards/rejected"])
    return out


class TrainMetrics:
    """Running sums between two logs: per-pair statistics, pairs, real tokens, grad norms."""

    def __init__(self, device: torch.device, keys: tuple[str, ...] = PAIR_KEYS):
        self.keys = keys
        self.sums = torch.zeros(len(keys), device=device)
        self.counts = torch.zeros(3, device=device)  # pairs, real (non-pad) tokens, positions
        self.grad_norms: list[torch.Tensor] = []

    def add_batch(self, stats: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """`stats` from `pair_stats`; `attention_mask` the batch's (1 on real tokens), padded or
        packed, for the real tokens and the share of positions computed for nothing."""
        self.sums += stats.sum(0)
        self.counts += torch.stack([torch.tensor(stats.shape[0], device=stats.device),
                                    attention_mask.sum(),
                                    torch.tensor(attention_mask.numel(), device=stats.device)
                                    ]).float()

    def add_grad_norm(self, grad_norm: torch.Tensor | float | None) -> None:
        if grad_norm is not None:
            self.grad_norms.append(torch.as_tensor(grad_norm, dtype=torch.float32))

    def compute(self, accelerator: Accelerator, seconds: float) -> dict[str, float]:
        """Reduce across processes (a sync point: once per log), return means, and reset."""
        totals = accelerator.reduce(torch.cat([self.sums, self.counts]), reduction="sum")
        sums, (pairs, tokens, positions) = totals[:-3], totals[-3:].tolist()
        metrics = class_means(dict(zip(self.keys, (sums / max(pairs, 1)).tolist())))
        if self.grad_norms:  # the norm is global already (clipping all-reduces it)
            norms = torch.stack(self.grad_norms)
            # A step the fp16 loss scaler skipped has an infinite norm (counted in
            # `skipped_steps`): the mean is over the steps that updated, and JSON has no inf.
            finite = norms[torch.isfinite(norms)]
            if finite.numel():
                metrics["grad_norm"] = finite.mean().item()
        metrics["tokens_per_sec"] = tokens / max(seconds, 1e-9)  # real tokens
        metrics["padding_fraction"] = 1.0 - tokens / positions if positions else 0.0
        self.sums.zero_()
        self.counts.zero_()
        self.grad_norms.clear()
        return metrics


class MetricsLogger:
    """Writes each log to `<output_dir>/metrics.jsonl`, the trackers, and the console (main)."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, total_steps: int,
                 initial_step: int = 0):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"
        self.progress = tqdm(total=total_steps, initial=initial_step, desc="train",
                             disable=not accelerator.is_main_process, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.accelerator.log(metrics, step=step)
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        shown = {k: metrics[k] for k in ("loss", "eval/loss", "rewards/accuracies",
                                         "eval/rewards/accuracies", "rewards/margins", "lr")
                 if k in metrics}
        self.progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def truncate_after(self, step: int) -> None:
        """Drop logs of steps after `step`, which a resume logs again, and a last line torn by
        a kill mid-write; rewritten atomically so a second kill cannot lose the log."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # torn line
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)


def log_train(accelerator, logger, metrics, scheduler, step, timer, epoch, skipped) -> float:
    """Reduce the metrics since the last log across processes and write them; restart the timer."""
    values = metrics.compute(accelerator, time.perf_counter() - timer)
    values.update(lr=scheduler.get_last_lr()[0], epoch=round(epoch, 4))
    logger.log(step, {**values, "skipped_steps": skipped} if skipped else values)
    return time.perf_counter()
