"""`python tests/kill_during_save.py STEP POINT <train.py flags>`: run train.py and SIGKILL it in
the middle of writing checkpoint-STEP — deterministically, where polling the file system for the
temporary directory would race a fast save. POINT is where the kill lands:

- ``mid-state``: the model weights are written, the optimizer state not yet (the first
  `torch.save` into the temporary directory);
- ``before-rename``: every state file is written, `trainer_state.json` and the rename not yet.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

import accelerate
import torch

ROOT = Path(__file__).resolve().parents[1]
STEP, POINT = int(sys.argv[1]), sys.argv[2]
TMP_NAME = f".tmp-checkpoint-{STEP}"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if POINT == "mid-state":
    torch_save = torch.save

    def save(obj, f, *args, **kwargs):
        if TMP_NAME in str(f):
            die()
        return torch_save(obj, f, *args, **kwargs)

    torch.save = save
elif POINT == "before-rename":
    save_state = accelerate.Accelerator.save_state

    def save_state_then_die(self, output_dir=None, *args, **kwargs):
        result = save_state(self, output_dir, *args, **kwargs)
        if output_dir is not None and Path(output_dir).name == TMP_NAME:
            die()
        return result

    accelerate.Accelerator.save_state = save_state_then_die
else:
    sys.exit(f"unknown kill point {POINT!r}")

sys.argv = ["train.py", *sys.argv[3:]]
sys.path.insert(0, str(ROOT))
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
