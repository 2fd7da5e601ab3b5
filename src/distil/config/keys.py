"""Recipe key paths: dotted names, and pointing an error at the line of the key it names."""

from __future__ import annotations

from distil.errors import DistilError


def locate_error(error: DistilError, file: str, lines: dict, overridden: set) -> DistilError:
    """`error` (which names a recipe key) with the file and line of that key."""
    path = key_path(error.field)
    line = None
    if any(path[: len(o)] == o for o in overridden):
        file = "command line"
    else:
        line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
    return DistilError(error.message, file=file, line=line, row=error.row, field=error.field)


def key_path(dotted: str) -> tuple:
    """"teachers.1.weight" -> ("teachers", 1, "weight"): list items by index, as pydantic locates errors."""
    return tuple(int(k) if k.isdigit() else k for k in dotted.strip().split("."))


