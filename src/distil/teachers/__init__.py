"""Teachers: anything that answers prompts with text and per-token soft targets."""
