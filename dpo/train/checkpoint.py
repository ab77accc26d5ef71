"""Resumable checkpoints (`accelerator.save_state`) written atomically, and the final model.

A checkpoint is written under a temporary name and renamed to `checkpoint-<step>` only once every
process has finished writing, so a directory with that name is always complete: a run killed
mid-save leaves the previous checkpoint as the latest.

Several nodes either share the output directory (one filesystem: rank 0 finalises each
checkpoint) or each has its own: then every node's local main process writes the replicated
model and optimizer state into its own copy and finalises it (accelerate's `save_on_each_node`),
so that each node can resume from its own files. `detect_shared_output_dir` decides at start.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from transformers import PreTrainedTokenizerBase

from dpo.config import (ConfigError, TrainConfig, as_field_value, default_of, field_types,
                        fold_rpo)
from dpo.train.best import to_prune

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint directory to resume from, or None; ConfigError if it does not exist."""
    if cfg.resume_from_checkpoint is None:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = checkpoints(Path(cfg.output_dir))
        if not found:
            raise ConfigError(f"resume_from_checkpoint: latest, but {cfg.output_dir} holds no "
                              "complete checkpoint-<step>; drop the flag to start afresh")
        return found[-1]
    path = Path(cfg.resume_from_checkpoint)
    if not CHECKPOINT_RE.match(path.name) or not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume_from_checkpoint: {path} is not a complete checkpoint-<step> "
                          "directory (one is renamed to that only when fully written)")
    return path


def agree_on_resume(accelerator: Accelerator, cfg: TrainConfig) -> Path | None:
    """`resolve_resume` in every process, which must all find the same checkpoint.

    Each node reads its own files, so without a shared filesystem `latest` could name a different
    step on each node, or one node could lack the checkpoint. Every process reports what it
    found; if they differ, every process raises the same ConfigError naming the ranks and what
    each sees (one process raising alone would leave the others waiting for it).
    """
    try:
        found, error = resolve_resume(cfg), None
    except ConfigError as e:
        found, error = None, str(e)
    views = gather_object([(found.name if found else None, error)])
    if len(set(views)) == 1:
        if error:
            raise ConfigError(error)
        return found
    ranks: dict[str, list[int]] = {}
    for rank, (name, _) in enumerate(views):
        ranks.setdefault(name or "none", []).append(rank)
    seen = "; ".join(f"{name} on rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}"
                     for name, r in ranks.items())
    raise ConfigError(f"resume_from_checkpoint {cfg.resume_from_checkpoint}: the processes do not "
                      f"find the same complete checkpoint in {cfg.output_dir} ({seen}); every "
                      "node must hold it")


# Settings that start-up may decide or change for the model at hand (dpo.model.probes.
# settle_logps_path): `router_aux_loss_coef`, `padding_free` and `share_prompt` when unset (None),
# `chunked_logps` turned off for a head the chunked path cannot serve. Checkpoints hold the settled
# values; a resume inherits those left unset, and compares the others once settled
# (`settled_changes`): the value given is not yet the value the run computes with.
SETTLED_AT_START = ("router_aux_loss_coef", "chunked_logps", "padding_free", "share_prompt")
# Settings that decide which pairs each optimizer step sees and how they are tokenized: a resume
# that changed any of them would not continue the same run.
RUN_IDENTITY = ("model", "dataset", "data_format", "num_samples", "eval_samples", "max_length",
                "max_prompt_length", "chat_template", "prompt_template", "strict_data",
                "chat_template_kwargs", "tools_file",
                "group_by_length", "seed", "batch_size", "gradient_accumulation_steps",
                "num_processes",
                # Which rows are drawn (and so which rows a resume skips past).
                "dataset_config", "data_dir", "split", "eval_dataset", "eval_dataset_config",
                "eval_data_dir", "eval_split", "streaming", "shuffle_buffer_size",
                "dataset_weights", "dataset_num_samples",
                # What checkpoints hold beside the model (BCO's baseline, a synced reference).
                "loss_type", "bco_baseline", "sync_ref_model",
                # What is trained and what it is compared with: the checkpoint's weights fit
                # only this model.
                "ref_model", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                "lora_modules_to_save", "load_in_4bit")
# Settings that may change between a run and its resume without a warning.
RESUME_ONLY = ("resume_from_checkpoint", "overwrite_output_dir")


def trainer_state(cfg: TrainConfig, num_processes: int, **position) -> dict:
    """What `trainer_state.json` records: the position in the data and the run's settings."""
    return {**position, "config": {**dataclasses.asdict(cfg), "num_processes": num_processes}}


def check_resume(path: Path, cfg: TrainConfig, num_processes: int) -> list[str]:
    """Refuse a resume that would not continue the same run; return the other changed settings.

    Raises ConfigError naming every changed setting of `RUN_IDENTITY` (model, data,
    tokenization, batch geometry): training on would silently be a different run. Those of
    `SETTLED_AT_START` are left to `settled_changes`.
    """
    try:
        saved = json.loads((path / STATE_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"resume_from_checkpoint: {path / STATE_FILE} is unreadable ({e})")
    saved = _with_later_fields(saved)
    now = {**dataclasses.asdict(cfg), "num_processes": num_processes}
    changed = [k for k in now if k not in (*RESUME_ONLY, *SETTLED_AT_START)
               and saved.get(k) != now[k]]
    fatal = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed if k in RUN_IDENTITY]
    if fatal:
        raise ConfigError(f"cannot resume from {path}: {'; '.join(fatal)} changed since it was "
                          "saved; restore them, or start a new run in another --output-dir")
    return changed


def inherit_start_up_choices(path: Path, cfg: TrainConfig) -> TrainConfig:
    """`cfg` with each setting that start-up decides when left unset (`SETTLED_AT_START`) taken
    from the checkpoint's run, so that the resumed run computes as that run did."""
    saved = _with_later_fields(json.loads((path / STATE_FILE).read_text())["config"])
    return dataclasses.replace(cfg, **{k: saved[k] for k in SETTLED_AT_START
                                       if getattr(cfg, k) is None})


def settled_changes(path: Path, cfg: TrainConfig) -> list[str]:
    """The settings of `SETTLED_AT_START` whose settled value differs from the checkpoint's run
    (call with `cfg` as `settle_logps_path` returned it)."""
    saved = _with_later_fields(json.loads((path / STATE_FILE).read_text())["config"])
    return [k for k in SETTLED_AT_START if saved[k] != getattr(cfg, k)]


def _with_later_fields(saved: dict) -> dict:
    """A checkpoint's settings as this version names them: a field added since it was saved
    has its default (the behaviour that run had), `use_chat_template` is `chat_template`, a
    field that has become a list (`dataset`, `split`, ...) holds the one value saved, and
    `rpo_alpha` is the mixture with `sft` it stands for."""
    saved = dict(saved)
    if "use_chat_template" in saved and "chat_template" not in saved:
        saved["chat_template"] = "auto" if saved.pop("use_chat_template") else "plain"
    for name, tp in field_types().items():
        saved[name] = as_field_value(tp, saved.get(name, default_of(name)))
    if saved["rpo_alpha"]:
        saved["loss_type"], saved["loss_weights"], saved["rpo_alpha"] = fold_rpo(
            saved["loss_type"], saved["loss_weights"], saved["rpo_alpha"])
    return saved


def prepare_output_dir(cfg: TrainConfig, resuming: bool) -> Path:
    """Refuse to mix two runs in one directory; `overwrite_output_dir` empties it first."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not resuming:
        if not cfg.overwrite_output_dir:
            raise ConfigError(f"output_dir: {out} is not empty; pass --resume-from-checkpoint "
                              "latest to continue that run, --overwrite-output-dir to replace it, "
                              "or choose another --output-dir")
        if out.resolve() in (Path.cwd(), *Path.cwd().parents):
            raise ConfigError(f"output_dir: refusing to overwrite {out}, which holds the "
                              "current directory")
    return out


def clear_output_dir(out: Path) -> None:
    """Empty `out` (main process, after `prepare_output_dir` allowed it)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def detect_shared_output_dir(accelerator: Accelerator, output_dir: Path) -> bool:
    """Whether every process sees rank 0's `output_dir` (one shared filesystem); if not, switch
    checkpoints to one complete copy per node (`save_on_each_node`).

    Rank 0 writes a marker with a fresh name and every process looks for it. ConfigError where a
    node-local copy cannot be complete: FSDP and DeepSpeed write each process's shard of the
    model and optimizer state, which the other nodes would never see.
    """
    if accelerator.is_local_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    marker = output_dir / broadcast_object_list([f".shared-{secrets.token_hex(8)}"])[0]
    if accelerator.is_main_process:
        marker.touch()
    accelerator.wait_for_everyone()
    seen = gather_object([marker.exists()])  # every process has looked once this returns
    if accelerator.is_main_process:
        marker.unlink()
    blind = [rank for rank, saw in enumerate(seen) if not saw]
    if not blind:
        return True
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"output_dir: {output_dir} is not shared by all nodes (rank(s) "
                          f"{', '.join(map(str, blind))} cannot see rank 0's files), but "
                          f"{accelerator.distributed_type.value} checkpoints are sharded across "
                          "the processes: use a directory on a filesystem all nodes share")
    accelerator.project_configuration.save_on_each_node = True
    accelerator.print(f"output_dir: {output_dir} is not shared by all nodes; each node keeps "
                      "complete checkpoints of its own")
    return False


def _finalises(accelerator: Accelerator) -> bool:
    """Whether this process renames and prunes its node's checkpoints (one process per copy)."""
    if accelerator.project_configuration.save_on_each_node:
        return accelerator.is_local_main_process
    return accelerator.is_main_process


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, state: dict,
                    total_limit: int | None, best_step: int | None = None) -> Path:
    """`save_state` into a temporary directory, then rename it to `checkpoint-<step>`: on rank 0,
    or on each node's local main process when the nodes do not share `output_dir`. Then prune
    to the newest `total_limit`, never removing `checkpoint-<best_step>` (`best.to_prune`)."""
    tmp = output_dir / f".tmp-checkpoint-{step}"
    final = output_dir / f"checkpoint-{step}"
    finalises = _finalises(accelerator)
    if finalises:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its shard and RNG state
    accelerator.wait_for_everyone()
    if finalises:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)  # same step saved by an earlier, resumed run
        os.replace(tmp, final)
        best = output_dir / f"checkpoint-{best_step}" if best_step is not None else None
        for old in to_prune(checkpoints(output_dir), total_limit, best):
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def save_final(accelerator: Accelerator, policy, tokenizer: PreTrainedTokenizerBase,
               output_dir: Path, merge_adapter: bool = False) -> None:
    """`save_pretrained` model (safetensors) and tokenizer (or a vision model's processor, which
    holds its tokenizer), loadable with `from_pretrained`; with LoRA the adapter instead
    (`dpo.model.lora_save.save_adapter`; `merge_adapter`: also merged).

    `get_state_dict` gathers the full weights when they are sharded (ZeRO-3, FSDP); every process
    must take part in that, only the main one writes.
    """
    from dpo.model import lora, lora_save

    if lora.peft_of(accelerator.unwrap_model(policy)) is not None:
        lora_save.save_adapter(accelerator, policy, tokenizer, output_dir, merge_adapter)
        return
    state_dict = accelerator.get_state_dict(policy)
    model = accelerator.unwrap_model(policy)
    model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True,
                          is_main_process=accelerator.is_main_process,
                          save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
