"""Tiny Qwen3-architecture models built from a config: for tests, benchmarks and the offline demo.

Nothing is downloaded: the weights are randomly initialised from a seed.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config


def tiny_qwen3_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                      num_heads: int = 4, num_kv_heads: int = 2, tie_word_embeddings: bool = False,
                      max_position_embeddings: int = 2048) -> Qwen3Config:
    """A Qwen3 config (grouped-query attention, q/k norms, SwiGLU) shrunk to a few layers."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_qwen3(vocab_size: int, *, seed: int = 0, **config_kwargs) -> PreTrainedModel:
    """A randomly initialised `Qwen3ForCausalLM` in fp32 with the given vocabulary size."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_qwen3_config(vocab_size, **config_kwargs))
