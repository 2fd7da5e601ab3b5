"""The generate stage: the one decoding primitive, the teacher cache, the teachers, explanation prompts, the teacher's view of a recipe."""
