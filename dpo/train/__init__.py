"""Training: the DPO step, the reference (its log-probs cache and TR-DPO sync), checkpoints,
safety stops, metrics, the accelerator and the data loaders of a run."""
