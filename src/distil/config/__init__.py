"""The recipe: its schema, loading and overrides, and the schemas of the classification and embedding tasks."""
