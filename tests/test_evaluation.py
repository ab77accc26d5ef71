"""Sample generations: eval mode and the KV cache, whatever mode training left the model in."""
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from dpo.evaluation import generate_answers
from dpo.tiny import tiny_qwen3


class _Tokenizer:
    pad_token_id = 0

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return " ".join(map(str, ids.tolist()))


def test_generation_runs_in_eval_mode_with_the_kv_cache():
    """A policy in train mode with gradient checkpointing (as during training) generates with
    the KV cache, in eval mode: every forward after the first gets one new token and the cache;
    the model is back in train mode afterwards."""
    model = tiny_qwen3(64)
    model.config.use_cache = False  # as `load_causal_lm` leaves it for training
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []

    def record(module, args, kwargs):
        calls.append((module.training, kwargs["input_ids"].shape[1],
                      kwargs.get("cache") is not None))  # transformers 5 names the KV cache so

    model.register_forward_pre_hook(record, with_kwargs=True)
    cfg = SimpleNamespace(max_new_tokens=4)
    answers = generate_answers(Accelerator(cpu=True), cfg, model, _Tokenizer(), [[1, 2, 3]])
    assert len(answers) == 1
    assert [training for training, _, _ in calls] == [False] * 4
    assert [length for _, length, _ in calls] == [3, 1, 1, 1]
    assert all(cached for _, _, cached in calls)
    assert model.training
