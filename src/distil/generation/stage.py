"""The generate stage: the recipe's teacher (or teachers) answer every prompt not yet in the cache."""

from __future__ import annotations

from distil.config.recipe import Recipe
from distil.data.examples import Example
from distil.generation.cache import shard_of
from distil.generation.storage import open_store
from distil.generation.teachers.many import Teachers, generate_many
from distil.generation.teachers.one import generate_rows
from distil.generation.view import TeacherPrompts


def teacher_view(recipe: Recipe) -> TeacherPrompts | Teachers:
    """The recipe's teacher(s): a `TeacherPrompts`, or for `teachers:` a `Teachers` with the same methods
    (prompts are per teacher, keys per row)."""
    return TeacherPrompts(recipe) if recipe.teachers is None else Teachers(recipe)


def fill_cache(recipe: Recipe, examples: list[Example], shard: tuple[int, int] | None = None) -> dict:
    """Ask the teacher(s) about those of `examples` not yet cached; returns the generate summary.

    Args:
        shard: (I, N): only the examples whose cache key (the row the student learns from) falls in
            shard I of N (`shard_of`), so N machines fill one cache between them; None: all.
    """
    view = TeacherPrompts(recipe) if recipe.teachers is None else None
    if shard is not None:
        index, count = shard
        keys = (view or Teachers(recipe)).keys(examples)
        examples = [ex for ex, key in zip(examples, keys) if shard_of(key, count) == index]
    if view is None:
        summary = generate_many(recipe, examples)
    else:
        open_store(recipe.cache_dir).check_writable("cache")
        summary = generate_rows(recipe, view, examples)
    return summary if shard is None else {"shard": f"{shard[0]}/{shard[1]}", **summary}
