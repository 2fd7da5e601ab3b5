"""The generate stage: the recipe's teacher (or teachers) answer every prompt not yet in the cache."""

from __future__ import annotations

from distil.config.recipe import Recipe
from distil.data.examples import Example
from distil.files import check_writable
from distil.generation.teachers.many import Teachers, generate_many
from distil.generation.teachers.one import generate_rows
from distil.generation.view import TeacherPrompts


def teacher_view(recipe: Recipe) -> TeacherPrompts | Teachers:
    """The recipe's teacher(s): a `TeacherPrompts`, or for `teachers:` a `Teachers` with the same methods
    (prompts are per teacher, keys per row)."""
    return TeacherPrompts(recipe) if recipe.teachers is None else Teachers(recipe)


def fill_cache(recipe: Recipe, examples: list[Example]) -> dict:
    """Ask the teacher(s) about those of `examples` not yet cached; returns the generate summary."""
    if recipe.teachers is not None:
        return generate_many(recipe, examples)
    check_writable(recipe.cache_dir, "cache")
    return generate_rows(recipe, TeacherPrompts(recipe), examples)
