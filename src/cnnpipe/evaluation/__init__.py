"""Scoring a checkpoint: metrics on logits and the evaluate stage's reports."""
