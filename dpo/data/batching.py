"""Batching tokenized pairs: length-grouped global batches, and the `[chosen; rejected]`
collator."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from dpo.data.shared_prompt import first_label, sequences, share_prompts
from dpo.data.tokenize import IGNORE_INDEX
from dpo.data.unpaired import with_kl_completions

# Float columns of precomputed reference log-probs (dpo.train.reference_cache), passed on by
# the collator.
REF_LOGPS_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class PreferenceCollator:
    """Pad tokenized pairs into one right-padded ``[chosen; rejected]`` batch, or pack them.

    For B rows it returns ``torch.long`` tensors of shape (2B, T): rows ``0..B-1`` are the chosen
    sequences, rows ``B..2B-1`` the rejected ones, row ``i`` and row ``B + i`` the same pair.
    ``labels`` are -100 on prompt and padding; ``attention_mask`` is 1 on real tokens. T is the
    longest sequence, rounded up to ``pad_to_multiple_of`` when given. Rows with precomputed
    reference log-probs (``REF_LOGPS_COLUMNS``) add them as ``(B,)`` float32 tensors of the same
    names, in pair order, and rows with a ``source`` (a mixture's eval rows, see
    ``dpo.data.mixture``) add it as a ``(B,)`` long tensor. Unpaired rows (KTO, with a
    ``label``) add it as a ``(B,)`` bool tensor, and their rejected rows are the mismatched
    completions of the KL estimate (``dpo.data.unpaired.with_kl_completions``, within
    ``max_length``).

    With ``padding_free`` the 2B sequences are instead laid end to end in as few rows as hold
    them within ``max_packed_tokens`` each (one row, unless they exceed it): ``input_ids``,
    ``labels``, ``attention_mask`` and ``position_ids`` are (R, L), the position ids restarting
    at 0 with every sequence, which is how transformers tells packed sequences apart. Shorter
    rows end in padding (attention_mask 0), a sequence of its own whose position ids count
    modulo the longest sequence's length, so that none exceeds what a sequence uses.
    ``packed_sequences`` (2B, 3) gives each sequence's (row, start, length), in
    ``[chosen; rejected]`` order; the first label of every sequence is -100, so that no label
    is predicted across a boundary.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None,
                 padding_free: bool = False, max_packed_tokens: int | None = None,
                 share_prompt: bool = False, max_length: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: call prepare_tokenizer(tokenizer) first")
        if max_packed_tokens is not None and max_packed_tokens < 1:
            raise ValueError(f"max_packed_tokens must be >= 1, got {max_packed_tokens}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free
        self.max_packed_tokens = max_packed_tokens
        self.share_prompt = share_prompt
        self.max_length = max_length

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if "label" in rows[0]:
            rows = with_kl_completions(rows, self.max_length)
        if self.share_prompt:
            cap = (self.max_packed_tokens or math.inf) if self.padding_free else None
            return self._columns(rows, share_prompts(rows, self.pad_token_id, self._width, cap))
        if "stages" in rows[0]:  # rankings: K slots of B sequences, [rank 1; rank 2; ...]
            slots = ranked_slots(rows)
            ids = [ids for slot in slots for ids, _ in slot]
            labels = [labels for slot in slots for _, labels in slot]
        else:
            # All chosen sequences first, then all rejected ones: row i and row B + i are a pair.
            ids = [row[f"{side}_input_ids"] for side in ("chosen", "rejected") for row in rows]
            labels = [row[f"{side}_labels"] for side in ("chosen", "rejected") for row in rows]
        batch = self._pack(ids, labels) if self.padding_free else self._pad(ids, labels)
        return self._columns(rows, batch)

    @staticmethod
    def _columns(rows: Sequence[Mapping], batch: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        """`batch` with the rows' per-pair columns added."""
        for name in REF_LOGPS_COLUMNS:
            if name in rows[0]:
                batch[name] = torch.tensor([row[name] for row in rows], dtype=torch.float32)
        if "label" in rows[0]:
            batch["label"] = torch.tensor([row["label"] for row in rows], dtype=torch.bool)
        if "source" in rows[0]:  # a mixture's eval pairs: the dataset each one comes from
            batch["source"] = torch.tensor([row["source"] for row in rows], dtype=torch.long)
        if "stages" in rows[0]:
            batch["ranking_mask"] = ranking_mask(rows)
            batch["stages"] = torch.tensor([row["stages"] for row in rows], dtype=torch.long)
        return batch

    def _width(self, width: int) -> int:
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def _pad(self, ids: list, labels: list) -> dict[str, torch.Tensor]:
        width = self._width(max(len(sequence) for sequence in ids))
        batch = {
            "input_ids": torch.full((len(ids), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
            "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long),
        }
        for i, (sequence, label) in enumerate(zip(ids, labels)):
            batch["input_ids"][i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            batch["attention_mask"][i, : len(sequence)] = 1
            batch["labels"][i, : len(label)] = torch.tensor(label, dtype=torch.long)
        return batch

    def _pack(self, ids: list, labels: list) -> dict[str, torch.Tensor]:
        lengths = [len(sequence) for sequence in ids]
        cap = self.max_packed_tokens or sum(lengths)
        if max(lengths) > cap:
            raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a packed row of "
                             f"max_packed_tokens {cap}")
        # First fit, longest first: few rows, so little padding at their ends.
        members: list[list[int]] = []
        fill: list[int] = []
        for i in sorted(range(len(ids)), key=lambda i: -lengths[i]):
            row = next((r for r, used in enumerate(fill) if used + lengths[i] <= cap), len(fill))
            if row == len(fill):
                members.append([])
                fill.append(0)
            members[row].append(i)
            fill[row] += lengths[i]
        width = self._width(max(fill))
        shape = (len(members), width)
        batch = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(shape, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros(shape, dtype=torch.long),
            "packed_sequences": torch.zeros((len(ids), 3), dtype=torch.long),
        }
        for row, indices in enumerate(members):
            start = 0
            for i in sorted(indices):  # [chosen; rejected] order within the row
                end = start + lengths[i]
                batch["input_ids"][row, start:end] = torch.tensor(ids[i], dtype=torch.long)
                batch["attention_mask"][row, start:end] = 1
                label = torch.tensor(labels[i], dtype=torch.long)
                label[0] = IGNORE_INDEX  # would be predicted by the previous sequence's end
                batch["labels"][row, start:start + len(label)] = label
                batch["position_ids"][row, start:end] = torch.arange(lengths[i])
                batch["packed_sequences"][i] = torch.tensor([row, start, lengths[i]])
                start = end
            batch["position_ids"][row, start:] = torch.arange(width - start) % max(lengths)
        return batch


def ranked_slots(rows: Sequence[Mapping]) -> list[list[tuple[list, list]]]:
    """The K slots of a ranked batch (K the rows' most responses), each B `(ids, labels)`: slot
    k holds each row's response of rank k + 1, or, where a row has fewer responses, its prompt
    alone with no label (log-prob 0; `ranking_mask` keeps it out of the loss)."""
    responses = [sequences(row) for row in rows]
    slots = []
    for k in range(max(map(len, responses))):
        slot = []
        for row, ranked in zip(rows, responses):
            if k < len(ranked):
                slot.append(ranked[k])
            else:
                prompt = first_label(row["chosen_labels"])
                slot.append((row["chosen_input_ids"][:prompt], [IGNORE_INDEX] * prompt))
        slots.append(slot)
    return slots


def ranking_mask(rows: Sequence[Mapping]) -> torch.Tensor:
    """(B, K) bool: row b has a response of rank k + 1."""
    counts = [2 + len(row["more_input_ids"]) for row in rows]
    return torch.arange(max(counts)) < torch.tensor(counts).unsqueeze(-1)


def num_pairs(batch: Mapping[str, torch.Tensor]) -> int:
    """How many pairs (or rankings) a collated batch holds, padded, packed or sharing
    prompts."""
    if "ranking_mask" in batch:
        return len(batch["ranking_mask"])
    if "shared_pairs" in batch:
        return len(batch["shared_pairs"])
    return len(batch.get("packed_sequences", batch["input_ids"])) // 2  # packed: (2B, 3)


def padding_fraction(batch: Mapping[str, torch.Tensor]) -> float:
    """Share of the batch's positions that are padding (from its attention mask)."""
    mask = batch["attention_mask"]
    return 1.0 - mask.sum().item() / mask.numel() if mask.numel() else 0.0


class LengthGroupedBatchSampler:
    """Batch sampler yielding micro-batches of pairs of similar length, global batch by global.

    Each epoch the pairs are shuffled with a generator seeded by ``(seed, epoch)``. With
    ``group_by_length`` the shuffled order is cut into mega-batches of ``mega_batch_mult`` global
    batches, each mega-batch is sorted by length (longest first) and cut into global batches, and
    the global batches are shuffled, so that each one holds pairs of similar length and padding
    shrinks while the data stays random at the scale of a few global batches.

    Which pairs form each global batch (and in which order) depends only on the seed, the epoch,
    ``global_batch_size`` and the lengths, never on ``micro_batch_size`` or the number of
    processes: an optimizer step sees the same pairs however the run is laid out, and resuming at
    micro-batch k of an epoch replays it exactly. Each global batch is emitted as consecutive
    micro-batches (accelerate deals micro-batch k to process k % num_processes).

    Tail: when the pairs do not fill the last global batch, it is topped up with the first pairs
    of the epoch's shuffled order. Every pair is seen each epoch, every optimizer step has
    ``global_batch_size`` pairs and every process the same number of micro-batches; the price
    is that up to ``global_batch_size - 1`` pairs are seen twice in that epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        group_by_length: bool = True,
        mega_batch_mult: int = 8,
    ):
        if len(lengths) == 0:
            raise ValueError("lengths is empty: there are no pairs to sample")
        if micro_batch_size < 1 or global_batch_size % micro_batch_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of "
                f"micro_batch_size {micro_batch_size}"
            )
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult must be >= 1, got {mega_batch_mult}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        self.epoch = epoch

    @property
    def num_global_batches(self) -> int:
        return math.ceil(len(self.lengths) / self.global_batch_size)

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return self.num_global_batches * (self.global_batch_size // self.micro_batch_size)

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches, each a list of ``global_batch_size`` pair indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        size = self.global_batch_size
        # np.resize repeats the order from its start: that tops up the last global batch.
        order = np.resize(rng.permutation(len(self.lengths)), self.num_global_batches * size)
        if self.group_by_length:
            mega = size * self.mega_batch_mult
            order = np.concatenate([
                chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                for chunk in np.split(order, range(mega, len(order), mega))
            ])
        batches = order.reshape(-1, size)
        # Without this, the longest batch would open every mega-batch.
        return batches[rng.permutation(len(batches))].tolist()

    def __iter__(self):
        for batch in self.global_batches():
            for start in range(0, self.global_batch_size, self.micro_batch_size):
                yield batch[start: start + self.micro_batch_size]
