"""Export formats, their runtimes, scoring artifacts, LoRA adaptation, speculative decoding."""
