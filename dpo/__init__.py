"""dpo: Direct Preference Optimization for causal language models, on torch and accelerate.

Read in the order data flows: `dpo.data` (pairs → tokens → `[chosen; rejected]` batches),
`dpo.forward` (one model call for both halves), `dpo.logprobs` (summed response log-probs),
`dpo.loss` (the DPO loss family).
"""
import os
from pathlib import Path

__version__ = "0.1.0"


def cache_root() -> Path:
    """Where dpo keeps what it builds once and reuses (demo assets, reference log-probs,
    tokenized pairs): ``$DPO_CACHE_DIR``, else ``~/.cache/dpo``."""
    return Path(os.environ.get("DPO_CACHE_DIR") or Path.home() / ".cache" / "dpo")
