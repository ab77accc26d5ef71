"""The offline demo: a tiny Qwen3 model, its tokenizer and preference data, built locally from
seeds, and the rule they follow (polite and on topic) that DPO learns and the demo judge checks."""
from dpo.demo.build import (BUILTIN_CHAT_MODEL, BUILTIN_DATASET, BUILTIN_MODEL, BUILTIN_PROMPTS,
                            CHAT_MODEL_DIR_NAME, COMPLETE_MARKER, DEMO_FORMAT_VERSION,
                            MODEL_CONFIG, SPECIAL_TOKENS, build_demo_chat_model,
                            build_demo_dataset, build_demo_model, build_demo_prompts,
                            build_tokenizer, demo_cache_dir, resolve_dataset, resolve_model)
from dpo.demo.rule import (NUM_TEST, NUM_TEST_PROMPTS, NUM_TRAIN, answer_accepted, demo_pairs,
                           demo_prompts, rule_holds)

__all__ = ["BUILTIN_CHAT_MODEL", "BUILTIN_DATASET", "BUILTIN_MODEL", "BUILTIN_PROMPTS",
           "CHAT_MODEL_DIR_NAME", "COMPLETE_MARKER", "DEMO_FORMAT_VERSION", "MODEL_CONFIG",
           "NUM_TEST", "NUM_TEST_PROMPTS", "NUM_TRAIN", "SPECIAL_TOKENS", "answer_accepted",
           "build_demo_chat_model", "build_demo_dataset", "build_demo_model",
           "build_demo_prompts", "build_tokenizer", "demo_cache_dir", "demo_pairs",
           "demo_prompts", "resolve_dataset", "resolve_model", "rule_holds"]
