"""The train stage: losses (pure functions), the objective, the one training loop, on-policy work."""
