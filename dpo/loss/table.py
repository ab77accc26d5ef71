"""The table of losses: each name, its function, and what it reads (`dpo_loss` dispatches on it,
`check_loss_options` validates against it)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from dpo.loss import anchored, delta, reference_free, unpaired
from dpo.loss.scores import LossOptions, Scores


@dataclass(frozen=True)
class Loss:
    """One entry of the table: the function, what it reads, and the label smoothing it takes."""

    fn: Callable[[Scores, LossOptions], torch.Tensor]
    reference: bool = True  # reads π_ref's log-probs
    lengths: bool = False  # reads the token counts
    # Label smoothing ε: (low, high, closed at high) it may take, and its value when unset;
    # None: the loss has none.
    smoothing: tuple[float, float, bool] | None = None
    default_smoothing: float = 0.0
    f_divergence: bool = False  # written in the score difference, so any f-divergence's
    per_token: bool = False  # divides each log-prob by its length (no LD-DPO on top)
    num_tokens: bool = False  # a token mean: reads the denominator `num_tokens` (sft's NLL)
    # Reads unpaired rows: one completion with a label, and a mismatched one for the KL estimate
    unpaired: bool = False


LOSSES = {
    "sigmoid": Loss(delta.sigmoid, smoothing=(0.0, 0.5, True), f_divergence=True),
    "robust": Loss(delta.robust, smoothing=(0.0, 0.5, False), f_divergence=True),
    "exo_pair": Loss(delta.exo_pair, smoothing=(0.0, 0.5, False), default_smoothing=1e-3,
                     f_divergence=True),
    "discopop": Loss(delta.discopop, f_divergence=True),
    "sigmoid_norm": Loss(delta.sigmoid_norm, lengths=True, per_token=True),
    "ipo": Loss(delta.ipo, lengths=True, per_token=True),
    "hinge": Loss(delta.hinge, f_divergence=True),
    "aot": Loss(delta.aot, smoothing=(0.0, 0.5, True)),
    "aot_unpaired": Loss(delta.aot_unpaired, smoothing=(0.0, 0.5, True)),
    "nca_pair": Loss(anchored.nca_pair),
    "bco_pair": Loss(anchored.bco_pair),
    "sppo_hard": Loss(anchored.sppo_hard),
    "apo_zero": Loss(anchored.apo_zero),
    "apo_down": Loss(anchored.apo_down),
    "simpo": Loss(reference_free.simpo, reference=False, lengths=True, per_token=True),
    "sft": Loss(reference_free.sft, reference=False, lengths=True, num_tokens=True),
    "orpo": Loss(reference_free.orpo, reference=False, lengths=True, per_token=True,
                 num_tokens=True),
    "kto": Loss(unpaired.kto, unpaired=True),
}
LOSS_TYPES = tuple(LOSSES)


def needs_reference(loss_types: str | Sequence[str]) -> bool:
    """Whether a loss (or any loss of a mixture) reads the reference model's log-probs."""
    return any(LOSSES[t].reference for t in as_list(loss_types))


def is_unpaired(loss_types: str | Sequence[str]) -> bool:
    """Whether the loss trains on unpaired rows (KTO): labelled completions, not pairs."""
    return any(LOSSES[t].unpaired for t in as_list(loss_types))


def as_list(loss_type: str | Sequence[str]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)
