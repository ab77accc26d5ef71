"""dpo: Direct Preference Optimization for causal language models, on torch and accelerate.

Read in the order data flows: `dpo.data` (pairs → tokens → `[chosen; rejected]` batches),
`dpo.forward` (one model call for both halves), `dpo.logprobs` (summed response log-probs),
`dpo.loss` (the DPO loss family).
"""
__version__ = "0.1.0"
