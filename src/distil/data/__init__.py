"""Prompts and examples from files, the train / held-out splits, quality filters, and batches of cached rows."""
