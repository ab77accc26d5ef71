"""Generation: the eval's sample answers (eval mode and the KV cache, whatever mode training left
the model in; batching), and online DPO's K sampled answers per prompt (seeded per batch, the same
however many processes run, cut at the first EOS token)."""
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from dpo.demo.tiny import tiny_qwen3
from dpo.eval import generation
from dpo.eval.generation import Sample, generate_answers, sample_answers, share
from tests.sampling_probe import PROMPTS, IdTokenizer


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
    answers = generate_answers(Accelerator(cpu=True), cfg, model, IdTokenizer(), [[1, 2, 3]])
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
        return generate_answers(Accelerator(cpu=True), cfg, model, IdTokenizer(), prompts)

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
            generate_answers(Accelerator(cpu=True), cfg, model, IdTokenizer(), prompts)


def test_shares_are_contiguous_and_cover_every_item():
    def shares(n, processes):
        return [share(SimpleNamespace(num_processes=processes, process_index=i), n)
                for i in range(processes)]

    assert shares(7, 2) == [([0, 1, 2, 3], 4), ([4, 5, 6], 4)]
    assert shares(1, 2) == [([0], 1), ([], 1)]
    assert shares(5, 1) == [([0, 1, 2, 3, 4], 5)]


def sample(model, prompts=PROMPTS, accelerator=None, **settings):
    settings = {"k": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 5, "batch_size": 2,
                "seed": 0, **settings}
    return sample_answers(accelerator or Accelerator(cpu=True), model, IdTokenizer(), prompts,
                          **settings)


def test_samples_are_seeded_and_leave_the_runs_random_state_alone():
    """k answers per prompt, in order; the same for the same seed, others for another seed; the
    run's random stream is where it was and the model back in train mode."""
    model = tiny_qwen3(64, seed=1)
    model.train()
    state = torch.random.get_rng_state()
    first = sample(model)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training
    assert len(first) == len(PROMPTS) and all(len(answers) == 3 for answers in first)
    assert all(isinstance(s, Sample) for answers in first for s in answers)
    assert all(len({s.text for s in answers}) == 3 for answers in first)  # sampled, not greedy
    assert sample(model) == first
    other = sample(model, seed=1)
    assert other != first and all(a != b for a, b in zip(other, first))


class _Process:
    """Process `index` of `count`, as `share` and `sample_answers` see it; generation runs in
    this one (gathering is left to the test)."""

    def __init__(self, index: int, count: int):
        self.process_index, self.num_processes = index, count
        self._accelerator = Accelerator(cpu=True)

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


@pytest.mark.parametrize("synced", [False, True])
def test_each_process_samples_its_share_of_the_batches(monkeypatch, synced):
    """5 prompts, batches of 2, over 2 processes: the first samples batches 0 and 1, the second
    batch 2; together they are one process's samples. Under ZeRO-3/FSDP the second also repeats
    batch 0, whose samples are dropped (here without `synced_gpus`, which needs the processes:
    the real 2-process runs are in tests/test_parallel.py)."""
    real, batches = generation._generate, []

    def spy(accelerator, model, tokenizer, batch, *, synced, **settings):
        batches.append(batch)
        return real(accelerator, model, tokenizer, batch, synced=False, **settings)

    monkeypatch.setattr(generation, "_synced", lambda accelerator: synced)
    monkeypatch.setattr(generation, "_generate", spy)
    model = tiny_qwen3(64, seed=1)
    one = sample(model)
    batches.clear()
    shares = [sample(model, accelerator=_Process(i, 2)) for i in range(2)]
    assert [len(s) for s in shares] == [4, 1]
    assert shares[0] + shares[1] == one
    repeat = [PROMPTS[:2]] if synced else []
    assert batches == [PROMPTS[:2], PROMPTS[2:4], PROMPTS[4:], *repeat]


def constant_model(tokens: list[int], logits: list[float] | None = None):
    """A model that draws `tokens` (with `logits`, else equal chances), whatever the context."""
    model = tiny_qwen3(64, seed=1)
    head = torch.nn.Linear(model.config.hidden_size, 64, bias=True)
    torch.nn.init.zeros_(head.weight)
    head.bias.data.fill_(-1e4)
    head.bias.data[tokens] = torch.tensor(logits or [0.0] * len(tokens))
    model.lm_head = head
    return model


def test_samples_are_drawn_from_the_whole_distribution():
    """No top-k cut (transformers' default keeps the 50 likeliest tokens): 384 draws from 63
    nearly equally likely tokens (all but the EOS, 1) see more than 50 of them."""
    tokens = [t for t in range(64) if t != 1]
    model = constant_model(tokens, [-t / 640 for t in tokens])
    drawn = {token for answers in sample(model, k=16, max_new_tokens=8) for s in answers
             for token in s.text.split()}
    assert len(drawn) > 50


def test_an_answer_ends_at_its_first_eos_token():
    """A model that draws 1, 3, 7 and 9 with equal chance: 3 is its generation config's EOS, 1
    the tokenizer's. An answer is the tokens before the first EOS (the padding after it, 0, is
    no token of the answer); without one it runs to max_new_tokens."""
    model = constant_model([1, 3, 7, 9])
    model.generation_config.eos_token_id = [3]
    samples = [s for answers in sample(model, k=8, max_new_tokens=3) for s in answers]
    for s in samples:
        tokens = s.text.split()
        assert set(tokens) <= {"7", "9"} and s.num_tokens == len(tokens)
        assert s.finished or s.num_tokens == 3
    assert {s.finished for s in samples} == {True, False}
    assert {s.num_tokens for s in samples if s.finished} == {0, 1, 2}


@pytest.mark.parametrize("setting, value, message", [
    ("k", 0, "k must be >= 1"), ("temperature", 0.0, "temperature must be > 0"),
    ("temperature", -1.0, "temperature must be > 0"), ("batch_size", 0, "batch_size must be >= 1"),
])
def test_bad_sampling_settings_are_refused(setting, value, message):
    with pytest.raises(ValueError, match=message):
        sample(tiny_qwen3(64), **{setting: value})
