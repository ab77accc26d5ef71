"""Reference log-probs computed once before training, kept as dataset columns and cached on disk.

The frozen reference's summed log-probs of a pair depend only on its weights, the pair's tokens
and the numerics (chunked or full logits, mixed precision, device, library versions), never on
the training step. With ``--precompute-ref-logps`` they are computed in one pass over the train
(and eval) pairs before training and stored as two float32 columns, ``ref_chosen_logps`` and
``ref_rejected_logps``; ``PreferenceCollator`` passes them on as ``(B,)`` tensors and ``dpo_step``
uses them instead of a reference forward. The reference model can then be dropped: a step costs
the policy's forward and backward (≈ 6N FLOPs per token instead of 8N) and the reference's
weights take no memory during training.

Multi-process (DDP, ZeRO): every process runs the same number of reference forwards (ZeRO-3's
forward is collective) on its own share of the batches, then the per-row values are summed across
processes; each row is computed by exactly one process, so the sum is exact and every process ends
with identical columns.

The cache is one safetensors file per key under ``cache_dir``; the key
(``dpo.train.reference_key``) hashes everything the values depend on: the caller's
``cache_key_parts`` (the reference model's files, an adapter's with its base's:
``reference_key_parts``), the token ids and labels of every row in order, the numerics
settings, the source of the modules in ``VALUE_CODE`` and the library versions. A file is
written under a temporary name and renamed (atomic), and checked on load (key, row count,
checksum, finite values); anything that does not check out is recomputed and rewritten.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from dpo.paths import cache_root
from dpo.config import TrainConfig
from dpo.config.model import is_adapter_dir, uses_peft
from dpo.data import REF_LOGPS_COLUMNS
from dpo.model.forward import concatenated_forward
from dpo.train.reference_key import CACHE_FORMAT_VERSION, cache_key, reference_key_parts

__all__ = [
    "REF_LOGPS_COLUMNS",
    "default_cache_dir",
    "precompute_reference_logps",
    "precompute_for_run",
]


def default_cache_dir() -> Path:
    """``$DPO_CACHE_DIR/ref-logps``, else ``~/.cache/dpo/ref-logps`` (as the demo assets)."""
    return cache_root() / "ref-logps"


def precompute_for_run(accelerator: Accelerator, cfg: TrainConfig, reference, model_path: str,
                       train_ds: Dataset, eval_ds: Dataset | None, collator
                       ) -> tuple[Dataset, Dataset | None]:
    """The train (and eval) pairs with the reference's log-probs, as `train.py` needs them."""
    path, how = _reference_source(cfg, model_path)
    parts = reference_key_parts(path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                                **({"load_in_4bit": True} if cfg.load_in_4bit else {}), **how)
    settings = dict(batch_size=cfg.eval_batch_size or cfg.batch_size, chunked=cfg.chunked_logps,
                    chunk_size=cfg.logps_chunk_size, cache_dir=default_cache_dir(),
                    cache_key_parts=parts, full_mask=bool(cfg.router_aux_loss_coef),
                    ld_alpha=cfg.ld_alpha)
    train_ds = precompute_reference_logps(accelerator, reference, train_ds, collator, **settings)
    if eval_ds is not None:
        # Batched as the eval loader batches them: the same shapes give bit-identical values, so
        # at step 0 (policy = reference) every margin is exactly 0, as with a live reference.
        eval_ds = precompute_reference_logps(accelerator, reference, eval_ds, collator,
                                             longest_first=False, **settings)
    return train_ds, eval_ds


def _reference_source(cfg: TrainConfig, model_path: str) -> tuple[str, dict]:
    """The path the reference is loaded from (as `dpo.model.loading`/`dpo.model.lora` load it), and
    how an adapter and peft enter it: merged into the base, or run beside it as a frozen copy."""
    from dpo.demo import resolve_model

    path = resolve_model(cfg.ref_model) if cfg.ref_model else model_path
    how = {}
    if is_adapter_dir(path):  # a --ref-model adapter, or an adapter start merged (lora_r)
        how["adapter"] = "merged" if cfg.ref_model or cfg.lora_r else "frozen copy"
    if how or (uses_peft(cfg) and not cfg.ref_model):  # peft computes the reference
        import peft

        how["peft"] = peft.__version__
    return path, how


def precompute_reference_logps(
    accelerator: Accelerator,
    reference: torch.nn.Module,
    dataset: Dataset,
    collator,
    *,
    batch_size: int,
    longest_first: bool = True,
    chunked: bool,
    chunk_size: int,
    cache_dir: str | Path | None,
    cache_key_parts: dict | None,
    full_mask: bool = False,
    ld_alpha: float | None = None,
) -> Dataset:
    """`dataset` with the reference's summed log-probs as columns ``ref_chosen_logps`` and
    ``ref_rejected_logps`` (float32, one value per row, the same in every process).

    Args:
        accelerator: the run's Accelerator; every process must call this, in the same order.
        reference: the frozen reference as `prepare_reference` returns it (a plain module, or a
            ZeRO-3 inference engine), already on the device.
        dataset: tokenized pairs (the columns of `data.tokenize_preferences`); existing
            ``ref_*`` columns are replaced.
        collator: the run's `PreferenceCollator` (padding or packing only changes float
            rounding; both are part of the cache key).
        batch_size: pairs per reference forward; no gradients are kept, so it can exceed the
            training micro-batch.
        longest_first: batch the rows longest first, to pad as little as possible; else in
            row order.
        chunked, chunk_size: the log-prob path, as `cfg.chunked_logps`/`cfg.logps_chunk_size`:
            the same as the on-the-fly reference uses, so that the values match it.
        cache_dir: where cache files go (`default_cache_dir()`); None disables the cache.
        cache_key_parts: what identifies the reference (`reference_key_parts`); None disables
            the cache, as the values could not be told apart from another model's.
        full_mask: run with the real attention mask, as the policy of a mixture of experts does
            (`concatenated_forward`), so that the values equal its forward's bit for bit.
        ld_alpha: store LD-DPO's length-desensitised log-probs (`dpo_step` applies it to the
            reference too); None: the plain sums.
    """
    dataset = dataset.remove_columns([c for c in REF_LOGPS_COLUMNS if c in dataset.column_names])
    if len(dataset) == 0:
        empty = np.zeros(0, dtype=np.float32)
        return _with_columns(dataset, torch.from_numpy(empty), torch.from_numpy(empty))
    path = None
    if cache_dir is not None and cache_key_parts is not None:
        key = cache_key(accelerator, dataset, chunked=chunked, chunk_size=chunk_size,
                        batching=(batch_size, longest_first, full_mask, collator.padding_free,
                                  collator.max_packed_tokens, collator.share_prompt),
                        cache_key_parts=cache_key_parts, ld_alpha=ld_alpha,
                        processor=getattr(collator, "processor", None))
        path = Path(cache_dir) / f"ref-logps-{key[:40]}.safetensors"
        cached = _load(path, key, len(dataset))
        # All processes must take the same branch, or the computing ones would wait forever in
        # the collective forward; a process that missed (e.g. a node without the file) decides.
        hits = accelerator.gather(torch.tensor([cached is not None], device=accelerator.device))
        if bool(hits.all()):
            accelerator.print(f"reference log-probs: {len(dataset)} pairs from cache {path}")
            return _with_columns(dataset, *cached)
    else:
        accelerator.print("reference log-probs: not cached (the reference model has no "
                          "files to key the cache on)")

    start = time.perf_counter()
    chosen, rejected = _compute(accelerator, reference, dataset, collator, batch_size=batch_size,
                                longest_first=longest_first, chunked=chunked,
                                chunk_size=chunk_size, full_mask=full_mask, ld_alpha=ld_alpha)
    accelerator.print(f"reference log-probs: {len(dataset)} pairs computed in "
                      f"{time.perf_counter() - start:.1f} s")
    if path is not None:
        # One writer per machine: with a shared file system the second rename replaces the first
        # with identical bytes; without one, every machine keeps its own copy.
        if accelerator.is_local_main_process:
            _save(path, key, chosen, rejected)
        accelerator.wait_for_everyone()
    return _with_columns(dataset, chosen, rejected)


def _compute(accelerator: Accelerator, reference, dataset: Dataset, collator, *, batch_size: int,
             longest_first: bool, chunked: bool, chunk_size: int, full_mask: bool,
             ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference forward over all rows, batches dealt round-robin to the processes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = (np.argsort(-np.asarray(dataset["length"]), kind="stable") if longest_first
             else np.arange(len(dataset)))
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    world, rank = accelerator.num_processes, accelerator.process_index
    # Every process runs ceil(#batches / world) forwards; one that has run out of batches
    # repeats the first and discards the result (ZeRO-3 gathers each layer collectively).
    mine = [k * world + rank for k in range(math.ceil(len(batches) / world))]
    loader = DataLoader(dataset, batch_sampler=[batches[k if k < len(batches) else 0]
                                                for k in mine], collate_fn=collator)
    values = torch.zeros(2, len(dataset), dtype=torch.float32, device=accelerator.device)
    training = reference.training
    reference.eval()
    with torch.no_grad():
        for k, batch in zip(mine, loader):
            batch = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
            with accelerator.autocast():  # the same numerics as the reference in dpo_step
                out = concatenated_forward(reference, batch, chunked=chunked,
                                           chunk_size=chunk_size, full_mask=full_mask,
                                           ld_alpha=ld_alpha)
            if k < len(batches):
                rows = torch.tensor(batches[k], device=accelerator.device)
                ld = ld_alpha is not None
                values[0, rows] = (out.chosen_ld_logps if ld else out.chosen_logps).float()
                values[1, rows] = (out.rejected_ld_logps if ld else out.rejected_logps).float()
    reference.train(training)
    # Each row is non-zero in exactly one process: the sum is exact, and the same everywhere.
    values = accelerator.reduce(values, reduction="sum").cpu()
    return values[0], values[1]


def _with_columns(dataset: Dataset, chosen: torch.Tensor, rejected: torch.Tensor) -> Dataset:
    for name, values in zip(REF_LOGPS_COLUMNS, (chosen, rejected)):
        dataset = dataset.add_column(name, values.numpy().astype(np.float32))
    return dataset


def _checksum(chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    return hashlib.sha256(chosen.numpy().tobytes() + rejected.numpy().tobytes()).hexdigest()


def _save(path: Path, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Write the cache file atomically: readers see the old file, or none, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp),
                  metadata={"key": key, "format": str(CACHE_FORMAT_VERSION),
                            "rows": str(chosen.numel()), "sha256": _checksum(chosen, rejected)})
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full disk costs the cache, not the run
        warnings.warn(f"could not write the reference log-prob cache {path}: {e}", stacklevel=2)
        tmp.unlink(missing_ok=True)


def _load(path: Path, key: str, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached values if `path` holds exactly what `key` names, else None (with the reason)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:  # one read: metadata and tensors
            metadata = f.metadata() or {}
            chosen, rejected = f.get_tensor("chosen"), f.get_tensor("rejected")
        problem = (
            "another key" if metadata.get("key") != key
            else "another format" if metadata.get("format") != str(CACHE_FORMAT_VERSION)
            else "a different row count" if not chosen.shape == rejected.shape == (rows,)
            else "a wrong dtype" if chosen.dtype != torch.float32 or rejected.dtype != chosen.dtype
            else "a bad checksum" if metadata.get("sha256") != _checksum(chosen, rejected)
            else "non-finite values" if not (chosen.isfinite().all() and rejected.isfinite().all())
            else None)
    except (SafetensorError, KeyError, OSError, ValueError) as e:
        problem = f"an unreadable file ({e})"
    if problem is not None:
        print(f"reference log-probs: ignoring cache file {path}: {problem}; recomputing",
              file=sys.stderr, flush=True)
        return None
    return chosen, rejected
