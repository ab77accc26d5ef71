"""dpo: Direct Preference Optimization for causal language models, on torch and accelerate.

Read in the order data flows: `dpo.data` (pairs → tokens → `[chosen; rejected]` batches),
`dpo.model` (loading, LoRA, one model call for both halves, summed response log-probs),
`dpo.loss` (the DPO loss family), `dpo.train` (the step, the reference, checkpoints), `dpo.eval`
(held-out metrics, judges, the model card); `train.py` and `python -m dpo.evaluate` on top.
`dpo/textbook.py` is the same DPO step written plainly, the spec the fast path is held to.

`dpo.dpo_loss`, `dpo.concatenated_forward` and `dpo.chunked_sequence_logps` are the public entry
points; they load on first use, so `import dpo` stays light and imports nothing of the package.
"""
import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "dpo_loss": "dpo.loss",
    "concatenated_forward": "dpo.model.forward",
    "chunked_sequence_logps": "dpo.model.logprobs",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # looked up once
    return value
