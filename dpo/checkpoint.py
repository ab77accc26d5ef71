"""Resumable checkpoints (`accelerator.save_state`) written atomically, and the final model.

A checkpoint is written under a temporary name and renamed to `checkpoint-<step>` only once every
process has finished writing, so a directory with that name is always complete: a run killed
mid-save leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from dpo.config import ConfigError, TrainConfig

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


# Settings that decide which pairs each optimizer step sees and how they are tokenized: a resume
# that changed any of them would not continue the same run.
RUN_IDENTITY = ("model", "dataset", "data_format", "num_samples", "eval_samples", "max_length",
                "max_prompt_length", "use_chat_template", "strict_data", "group_by_length",
                "seed", "batch_size", "gradient_accumulation_steps", "num_processes")
# Settings that may change between a run and its resume without a warning.
RESUME_ONLY = ("resume_from_checkpoint", "overwrite_output_dir")


def trainer_state(cfg: TrainConfig, num_processes: int, **position) -> dict:
    """What `trainer_state.json` records: the position in the data and the run's settings."""
    return {**position, "config": {**dataclasses.asdict(cfg), "num_processes": num_processes}}


def check_resume(path: Path, cfg: TrainConfig, num_processes: int) -> list[str]:
    """Refuse a resume that would not continue the same run; return the other changed settings.

    Raises ConfigError naming every changed setting of `RUN_IDENTITY` (model, data,
    tokenization, batch geometry): training on would silently be a different run.
    """
    try:
        saved = json.loads((path / STATE_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"resume_from_checkpoint: {path / STATE_FILE} is unreadable ({e})")
    now = {**dataclasses.asdict(cfg), "num_processes": num_processes}
    changed = [k for k in now if k not in RESUME_ONLY and saved.get(k) != now[k]]
    fatal = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed if k in RUN_IDENTITY]
    if fatal:
        raise ConfigError(f"cannot resume from {path}: {'; '.join(fatal)} changed since it was "
                          "saved; restore them, or start a new run in another --output-dir")
    return changed


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


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, state: dict,
                    total_limit: int | None) -> Path:
    """`save_state` into a temporary directory, then rename it to `checkpoint-<step>`."""
    tmp = output_dir / f".tmp-checkpoint-{step}"
    final = output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its shard and RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)  # same step saved by an earlier, resumed run
        os.replace(tmp, final)
        for old in checkpoints(output_dir)[:-total_limit] if total_limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def save_final(accelerator: Accelerator, policy, tokenizer: PreTrainedTokenizerBase,
               output_dir: Path) -> None:
    """`save_pretrained` model (safetensors) and tokenizer, loadable with `from_pretrained`.

    `get_state_dict` gathers the full weights when they are sharded (ZeRO-3, FSDP); every process
    must take part in that, only the main one writes.
    """
    state_dict = accelerator.get_state_dict(policy)
    model = accelerator.unwrap_model(policy)
    model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True,
                          is_main_process=accelerator.is_main_process,
                          save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
