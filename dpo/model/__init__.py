"""The model: loading the policy and reference, LoRA, one forward for both halves of a batch,
the summed response log-probs, and attention within packed sequences."""
