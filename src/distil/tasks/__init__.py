"""Distillation tasks other than causal language modelling: classification and embedding.

Each task module has the same stage functions as `distil.pipeline` — `generate` (teacher
soft labels / embeddings into the teacher cache), `train`, `evaluate`, `export` (artifacts
scored into the report, see `distil.tasks.export`) — taking its own recipe model from
`distil.tasks.config`. `stage(recipe, name)` dispatches.
"""

from __future__ import annotations


def stage(recipe, name: str, **kwargs):
    """Run stage `name` ("generate", "train", "evaluate", "export") of a classification or embedding recipe."""
    if recipe.task == "classification":
        from distil.tasks import classification as module
    else:
        from distil.tasks import embedding as module
    return getattr(module, name)(recipe, **kwargs)
