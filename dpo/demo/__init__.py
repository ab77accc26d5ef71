"""The offline demo: a tiny Qwen3 model, its tokenizer and preference data built locally from
seeds, and the rule they follow (polite and on topic) that DPO learns and the demo judge checks."""
from dpo.demo.build import *  # noqa: F401,F403
