"""`sample_answers` of a tiny random model, written as JSON by the main process: run by
tests/test_parallel.py on one process and under `accelerate launch` on two, whose samples must be
the same. `--synced` forces the lockstep of ZeRO-3 and FSDP (every process makes the same
`generate` calls, `synced_gpus`) on plain DDP: a process that skipped its repeated batch would
leave the other waiting forever.

    python tests/sampling_probe.py OUT.json [--synced]
"""
import json
import sys
from dataclasses import asdict

import torch
from accelerate import Accelerator

from dpo.demo.tiny import tiny_qwen3
from dpo.eval import generation

# 5 prompts in batches of 2: 3 batches, 2 for the first of two processes and 1 for the second.
PROMPTS = [[5, 6, 7], [3], [11, 12, 13, 14], [40, 41], [2, 2, 9]]


class IdTokenizer:
    """Token ids as text ("5 6 7"): what was generated, nothing skipped."""

    pad_token_id, eos_token_id = 0, 1

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return " ".join(str(int(token)) for token in ids)


def main(out: str, synced: bool) -> None:
    accelerator = Accelerator(cpu=True)
    if synced:
        generation._synced = lambda accelerator: True
    model = tiny_qwen3(64, seed=3)
    torch.manual_seed(accelerator.process_index)  # each process's own stream: samples ignore it
    samples = generation.sample_answers(accelerator, model, IdTokenizer(), PROMPTS, k=3,
                                        temperature=1.0, top_p=0.9, max_new_tokens=6,
                                        batch_size=2, seed=7)
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump([[asdict(sample) for sample in answers] for answers in samples], f)


if __name__ == "__main__":
    main(sys.argv[1], "--synced" in sys.argv[2:])
