"""distil: turn a large teacher model and a set of prompts into a small student model.

The stages are plain functions (the CLI only wraps them):

    from distil import load_recipe, generate, train, evaluate, run
    recipe = load_recipe("recipes/quickstart.yaml", ["train.steps=20"])
    run(recipe)
"""

from distil.config.loading import load_recipe
from distil.config.recipe import Recipe
from distil.errors import DistilError

__all__ = ["DistilError", "Recipe", "load_recipe", "generate", "train", "evaluate", "run"]


def __getattr__(name):
    # The stages pull in torch and transformers: import them only when asked for.
    if name in ("generate", "train", "evaluate", "run"):
        from distil import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)
