"""Teacher backends: a local model, an OpenAI-compatible endpoint, several teachers."""
