"""Distillation tasks other than causal language modelling: classification and embedding.

Each task module has the same stage functions as `distil.pipeline` — `generate` (teacher
soft labels / embeddings into the teacher cache), `train`, `evaluate`, `export` (artifacts
scored into the report, see `distil.tasks.export`) — taking its own recipe model from
`distil.config.tasks`. `stage(recipe, name)` dispatches.
"""

from __future__ import annotations

import importlib.util

from distil.errors import DistilError

# What each task needs beyond distil's core install: the `tasks` extra (pip install 'distil[tasks]').
EXTRA_PACKAGES = {"classification": ("sklearn",), "embedding": ("sentence_transformers", "scipy")}


def require_extra(task: str) -> None:
    """Fail with one clear line when the packages `task` needs are not installed."""
    missing = [name for name in EXTRA_PACKAGES.get(task, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise DistilError(f"task: {task} needs {', '.join(missing)}, which the core install leaves out: "
                          "pip install 'distil[tasks]'", field="task")


def stage(recipe, name: str, **kwargs):
    """Run stage `name` ("generate", "train", "evaluate", "export") of a classification or embedding recipe."""
    require_extra(recipe.task)
    if recipe.task == "classification":
        from distil.tasks import classification as module
    else:
        from distil.tasks import embedding as module
    return getattr(module, name)(recipe, **kwargs)
