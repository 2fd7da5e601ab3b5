"""Loading a recipe: YAML, key.sub=value overrides, validation; every mistake a DistilError naming file, line and field."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from distil.config.keys import key_path, locate_error
from distil.config.recipe import RENAMED_KEYS, Recipe
from distil.errors import DistilError


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items() if not f.exclude]


def _section_model(path: tuple, root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `path` (None if not a section)."""
    model: type[BaseModel] = root or Recipe
    for key in path:
        if isinstance(key, int):  # an item of a list of sections (teachers.0): the item's model
            continue
        field = model.model_fields.get(key)
        if field is None:
            return None
        ann = field.annotation
        args = [a for x in getattr(ann, "__args__", (ann,)) for a in (getattr(x, "__args__", ()) if
                getattr(x, "__origin__", None) is list else (x,))]
        candidates = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML text to its 1-based line number."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (k.value,)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _unknown_key_error(path: tuple, file: str, line: int | None, via: str = "",
                       root: type[BaseModel] | None = None) -> DistilError:
    dotted = ".".join(map(str, path))
    if dotted in RENAMED_KEYS:
        return DistilError(f"{dotted} was renamed to {RENAMED_KEYS[dotted]}", file=file, line=line, field=dotted)
    parent = _section_model(path[:-1], root)
    valid = _field_names(parent) if parent else []
    close = difflib.get_close_matches(str(path[-1]), valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
    return DistilError(f"unknown key{via}{hint}", file=file, line=line, field=dotted)


def apply_override(data: dict, override: str, root: type[BaseModel] | None = None) -> None:
    """Apply one `key.sub=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise DistilError(f"override '{override}' is not of the form key.sub=value", file="command line")
    dotted, raw = override.split("=", 1)
    keys = list(key_path(dotted))
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise DistilError(f"cannot parse value '{raw}': {e.problem}", field=dotted) from None
    node = data
    for depth, key in enumerate(keys):
        if isinstance(key, int) or isinstance(node, list):  # an item of a list (teachers.1.weight=2)
            if not (isinstance(node, list) and isinstance(key, int) and key < len(node)):
                raise DistilError("no such item in the recipe (items count from 0)", file="command line",
                                  field=".".join(map(str, keys[: depth + 1])))
            if depth == len(keys) - 1:
                node[key] = value
                return
            node = node[key]
            continue
        if depth == len(keys) - 1:
            break
        if not isinstance(node.get(key), (dict, list)):
            if _section_model(tuple(keys[: depth + 1]), root) is None:
                raise _unknown_key_error(tuple(keys[: depth + 1]), "command line", None, " in override", root)
            node[key] = {}
        node = node[key]
    parent = _section_model(tuple(keys[:-1]), root)
    if parent is not None and keys[-1] not in _field_names(parent):
        raise _unknown_key_error(tuple(keys), "command line", None, " in override", root)
    node[keys[-1]] = value


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path: the YAML file.
        overrides: `key.sub=value` strings, applied in order (e.g. "train.steps=50").

    Returns:
        The validated `Recipe`, its `source` set to `path`.

    Example:
        >>> r = load_recipe("recipes/quickstart.yaml", ["train.steps=10", "out=/tmp/q"])
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DistilError("recipe file not found", file=file) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DistilError(f"cannot read recipe: {e}", file=file) from None
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DistilError(f"YAML syntax error: {getattr(e, 'problem', None) or e}", file=file,
                          line=mark.line + 1 if mark else None) from None
    if data is None:
        raise DistilError("recipe is empty", file=file)
    if not isinstance(data, dict):
        raise DistilError("a recipe must be a mapping of sections (teacher, student, data, ...)", file=file, line=1)
    root = _task_model(data, overrides)
    overridden: set[tuple] = set()
    for override in overrides:
        apply_override(data, override, root)
        overridden.add(key_path(override.split("=", 1)[0]))
    try:
        recipe = root.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, file, lines, overridden, root) from None
    except DistilError as e:  # a check across keys (Recipe._teacher_sections) names the key itself
        raise locate_error(e, file, lines, overridden) from None
    recipe.source = file
    recipe._lines, recipe._overridden = lines, overridden
    return recipe


def _task_model(data: dict, overrides) -> type[BaseModel]:
    """The recipe model for the recipe's `task` (a `task=...` override wins); Recipe for causal_lm."""
    task = data.get("task")
    for override in overrides:
        if override.split("=", 1)[0].strip() == "task":
            task = override.split("=", 1)[1].strip()
    if task in ("classification", "embedding"):
        from distil.config.tasks import TASK_RECIPES
        return TASK_RECIPES[task]
    return Recipe


def _field_path(loc: tuple) -> tuple:
    """A pydantic error location as recipe keys: without union-branch tags; a dict's bad key is the field."""
    return tuple(p for p in loc if not (isinstance(p, str) and p.startswith(("function-after", "literal[", "dict[")))
                 and p != "[key]")


def _meant_for_branch(error: dict) -> bool:
    """Whether a union branch's error is about a value of that branch's own kind (a dict for dict[...])."""
    return any(isinstance(p, str) and p.startswith("dict[") for p in error["loc"]) and isinstance(error.get("input"), dict)


def _validation_error(e: ValidationError, file: str, lines: dict, overridden: set,
                      root: type[BaseModel] | None = None) -> DistilError:
    errors = e.errors()
    first = _field_path(errors[0]["loc"])
    # A value that fits no branch of a union (a name, or a dict of names): the deepest error under the
    # same field says what is wrong with the branch the value was meant for.
    under_first = [x for x in errors if _field_path(x["loc"])[: len(first)] == first]
    # A wrong `task` decides which keys every other section may have: name it first. Then a misspelt
    # key, which also leaves its intended key missing: the misspelling is what to fix.
    err = next((x for x in errors if _field_path(x["loc"]) == ("task",)), None) or \
        next((x for x in errors if x["type"] == "extra_forbidden"), None) or \
        max(under_first, key=lambda x: (len(_field_path(x["loc"])), _meant_for_branch(x)))
    loc = _field_path(err["loc"])
    source = "command line" if any(loc[: len(o)] == o for o in overridden) else file
    line = None if source == "command line" else next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
    if err["type"] == "extra_forbidden":
        return _unknown_key_error(loc, source, line, root=root)
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return DistilError(msg, file=source, line=line, field=".".join(map(str, loc)) or None)


