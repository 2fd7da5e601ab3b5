"""The one error type for user mistakes.

A `DistilError` names where the problem is (file, line or row, field) and what is wrong.
The CLI prints it as one line and exits non-zero; anything else is a bug and keeps its
traceback (shown with `--debug`).
"""

from __future__ import annotations


class DistilError(Exception):
    """A user mistake: bad recipe, bad data file, unusable model, unreachable teacher...

    Args:
        message: what is wrong, phrased for the user.
        file: the file at fault, if any.
        line: 1-based line of a text file (JSONL, CSV, YAML), if known.
        row: 1-based row of a table without lines (Parquet), if known.
        field: the recipe key or data column at fault, if any.

    Example:
        >>> str(DistilError("expected a string", file="p.jsonl", line=3, field="prompt"))
        'p.jsonl:3: field "prompt": expected a string'
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 row: int | None = None, field: str | None = None):
        self.message, self.file, self.line, self.row, self.field = message, file, line, row, field
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ""
        if self.file is not None:
            where = str(self.file) + (f":{self.line}" if self.line is not None else "") + ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        if self.row is not None:
            where += f"row {self.row}: "
        field = f'field "{self.field}": ' if self.field else ""
        return f"{where}{field}{self.message}"


def is_disk_full(error: BaseException, path=None) -> bool:
    """Whether `error` means no space (or quota) is left, whatever library raised it.

    Some writers (torch.save's zip writer) report a full disk only as a generic stream
    error; with `path` given, an error raised while almost no space is left there counts too.
    """
    import errno
    import shutil

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left on device" in text or "os error 28" in text or "StorageFull" in text:
        return True
    if path is not None:
        try:
            return shutil.disk_usage(path).free < 1 << 20
        except OSError:
            return False
    return False


def require(module: str, extra: str) -> None:
    """A clear error when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DistilError(f"this needs the '{module}' package: pip install 'distil[{extra}]'")


