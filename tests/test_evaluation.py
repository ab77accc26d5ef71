"""Sample generations: eval mode and the KV cache, whatever mode training left the model in."""
from types import SimpleNamespace

import pytest
from accelerate import Accelerator

from dpo.eval.evaluation import generate_answers, log_samples, share, summary
from dpo.demo.tiny import tiny_qwen3


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
    cfg = SimpleNamespace(max_new_tokens=4, generation_temperature=0.0, generation_top_p=1.0,
                          generation_batch_size=8, seed=0)
    answers = generate_answers(Accelerator(cpu=True), cfg, model, _Tokenizer(), [[1, 2, 3]])
    assert len(answers) == 1
    assert [training for training, _, _ in calls] == [False] * 4
    assert [length for _, length, _ in calls] == [3, 1, 1, 1]
    assert all(cached for _, _, cached in calls)
    assert model.training


def test_batched_generation_matches_one_prompt_at_a_time():
    """Prompts of different lengths, left-padded into batches, get the answers each gets alone;
    in order, whatever the batch size."""
    model = tiny_qwen3(64, seed=1)
    prompts = [[5, 6, 7, 8, 9, 10], [3], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47], [2, 2]]

    def answers(batch_size):
        cfg = SimpleNamespace(max_new_tokens=6, generation_temperature=0.0, generation_top_p=1.0,
                              generation_batch_size=batch_size, seed=0)
        return generate_answers(Accelerator(cpu=True), cfg, model, _Tokenizer(), prompts)

    alone = answers(1)
    assert len(alone) == 5 and len(set(alone)) > 1
    assert answers(3) == alone
    assert answers(8) == alone


def test_a_prompt_without_tokens_is_refused_in_one_line():
    """Tokenizing drops pairs without prompt tokens; should one still get here, alone or beside
    others, it is refused by name rather than crashing (a float tensor) or generating from
    padding."""
    model = tiny_qwen3(64)
    cfg = SimpleNamespace(max_new_tokens=2, generation_temperature=0.0, generation_top_p=1.0,
                          generation_batch_size=8, seed=0)
    for prompts, index in (([[]], 0), ([[1, 2], []], 1)):
        with pytest.raises(ValueError, match=rf"sample prompt {index} has no tokens"):
            generate_answers(Accelerator(cpu=True), cfg, model, _Tokenizer(), prompts)


def test_shares_are_contiguous_and_cover_every_item():
    def shares(n, processes):
        return [share(SimpleNamespace(num_processes=processes, process_index=i), n)
                for i in range(processes)]

    assert shares(7, 2) == [([0, 1, 2, 3], 4), ([4, 5, 6], 4)]
    assert shares(1, 2) == [([0], 1), ([], 1)]
    assert shares(5, 1) == [([0, 1, 2, 3, 4], 5)]


def test_summary_shows_the_judged_answers():
    base = {"eval/loss": 0.1, "eval/rewards/accuracies": 1.0, "eval/rewards/margins": 5.0}
    text = summary({}, {**base, "eval/win_rate": 0.9, "eval/reward/policy": 0.85,
                        "eval/reward/reference": 0.05})
    assert "win_rate            0.9000" in text and "reward/reference    0.0500" in text
    assert "win_rate" not in summary({}, base)


def test_samples_go_to_the_trackers_as_a_table():
    """wandb-like trackers get `log_table`; TensorBoard's writer a markdown table as text."""
    calls = []

    class Table:
        def log_table(self, name, columns, data, step):
            calls.append(("table", name, columns, data, step))

    class Writer:
        def add_text(self, name, text, global_step):
            calls.append(("text", name, text, global_step))

    samples = [{"prompt": "p", "policy": "a", "reward_policy": 1.0}]
    log_samples(SimpleNamespace(trackers=[Table(), SimpleNamespace(writer=Writer())]), 7, samples)
    assert calls[0] == ("table", "eval/samples", ["prompt", "policy", "reward_policy"],
                        [["p", "a", 1.0]], 7)
    assert calls[1] == ("text", "eval/samples",
                        'prompt | policy | reward_policy\n--- | --- | ---\n"p" | "a" | 1.0', 7)
