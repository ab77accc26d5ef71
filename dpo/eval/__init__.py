"""Evaluation: held-out DPO metrics and sample answers, judges and the win rate, and the model
card written beside a trained model."""
