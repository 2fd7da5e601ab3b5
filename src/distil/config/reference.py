"""docs/recipe.md, generated from the recipe schemas: every section and key with its type, default and description.

    python -m distil.config.reference > docs/recipe.md

tests/test_recipe_reference.py checks that docs/recipe.md is what this writes.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any, Literal, Union

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from distil.config.recipe import Recipe
from distil.config.tasks import TASK_RECIPES

COMMAND = "python -m distil.config.reference > docs/recipe.md"

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null", Any: "any"}
_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "<="))


def _bounds(metadata) -> list[str]:
    """Constraints as text: "> 0", "at least 1 item"."""
    out = []
    for m in metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(m, kind):
                out.append(f"{sign} {getattr(m, attr)}")
        if isinstance(m, annotated_types.MinLen):
            out.append(f"at least {m.min_length} item{'s' if m.min_length != 1 else ''}")
        if isinstance(m, annotated_types.MaxLen):
            out.append(f"at most {m.max_length} items")
    return out


def _models(annotation) -> list[type[BaseModel]]:
    """The recipe sections (pydantic models) inside a type, e.g. in `list[TeacherMember] | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def type_text(annotation) -> str:
    """A type as a recipe writer reads it: `integer`, `a | b`, `list of string`, `number or null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is Annotated:
        bounds = _bounds(args[1:]) + [b for a in args[1:] if isinstance(a, FieldInfo) for b in _bounds(a.metadata)]
        return type_text(args[0]) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        options = [type_text(a) for a in args if a is not type(None)]
        text = " or ".join(f"({o})" if " or " in o else o for o in options)
        return text + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_inner(args[0])}" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {_inner(args[0])} to {_inner(args[1])}" if args else "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _inner(annotation) -> str:
    text = type_text(annotation)
    return f"({text})" if " | " in text or " or " in text else text


def default_text(field: FieldInfo) -> str:
    """The default as it would be written in YAML; "required" when there is none."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "its keys' defaults"
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fields(model: type[BaseModel]):
    """(key, field) of a section, as written in YAML (aliases), leaving out what is not a YAML key."""
    return [(field.alias or name, field) for name, field in model.model_fields.items() if not field.exclude]


def _doc(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def _sections(model: type[BaseModel], path: str, heading: str) -> list[str]:
    """The table of `model`'s keys under a heading, then one section for each nested section, depth first."""
    lines = [f"{heading} {f'`{path}`' if path else 'Top-level keys'}", ""]
    if _doc(model):
        lines += [_doc(model), ""]
    lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    nested = []
    for key, field in _fields(model):
        dotted = f"{path}.{key}" if path else key
        sub = _models(field.annotation)
        kind = type_text(field.annotation)
        if _bounds(field.metadata):
            bounds = ", ".join(_bounds(field.metadata))
            kind += f" ({bounds.replace('item', 'character') if field.annotation is str else bounds})"
        if sub:
            item = typing.get_origin(field.annotation) is list or any(
                typing.get_origin(a) is list for a in typing.get_args(field.annotation))
            where = f"{dotted}[]" if item else dotted
            kind = kind.replace("section", f"section `{where}`")
            nested.append((sub[0], where))
        lines.append(f"| `{key}` | {_cell(kind)} | {_cell(default_text(field))} | {_cell(field.description or '')} |")
    lines.append("")
    for sub, where in nested:
        lines += _sections(sub, where, heading)
    return lines


def markdown() -> str:
    """docs/recipe.md: the causal-LM recipe, then the classification and embedding recipes."""
    lines = ["# Recipe reference", "",
             f"Generated from the recipe schemas (`src/distil/config/recipe.py`, `src/distil/config/tasks.py`) by "
             f"`{COMMAND}`; edit those, not this file.", "",
             "A recipe is a YAML file; any key can also be set on the command line as `key.sub=value` "
             "(e.g. `distil run recipes/quickstart.yaml train.steps=50`). Relative `data.*` paths resolve "
             "against the recipe file's folder; `out` and `cache` against the working directory.", ""]
    recipes = [("causal_lm", Recipe)] + list(TASK_RECIPES.items())
    for task, model in recipes:
        title = f"## `task: {task}`" + (" (the default)" if task == "causal_lm" else "")
        lines += [title, ""]
        lines += _sections(model, "", "###")
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
