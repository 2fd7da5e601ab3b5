"""Loading prompts/examples from JSONL, CSV, Parquet or a Hugging Face dataset, and turning them into prompt text.

Every row needs either `prompt` (a non-empty string) or `messages` (an OpenAI-style chat:
a non-empty list of {"role": "system"|"user"|"assistant", "content": str}). Optional
string columns: `reference`, `category`, `language`. Other columns are ignored.

Every mistake in a data file raises `DistilError` naming the file, the line (JSONL, CSV)
or row (Parquet) and the field, so the user can go straight to it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distil.data.hf_datasets import is_dataset_source, open_dataset
from distil.errors import DistilError

ROLES = ("system", "user", "assistant")
OPTIONAL_FIELDS = ("reference", "category", "language")
JSONL_SUFFIXES = (".jsonl", ".json-lines", ".jsonlines")
# A row's text beyond this is a mistake (a whole document pasted in, a broken export), not a
# prompt: even at data.max_prompt_tokens it would be cut to its last few hundred tokens.
MAX_ROW_CHARS = 200_000


@dataclass(frozen=True)
class Example:
    """One prompt (as a chat) with its optional reference answer and labels.

    Args:
        messages: OpenAI-style chat messages; a plain `prompt` becomes one user message.
        reference: the expected answer, if the data has one.
        category: a free label (task, domain...), used for per-category reports.
        language: a language code, used to route between teachers.
        source: where the example came from: "file:line" or "file: row N".
    """

    messages: tuple[dict, ...]
    reference: str | None = None
    category: str | None = None
    language: str | None = None
    source: str = ""

    @property
    def location(self) -> dict:
        """`source` as DistilError's keywords: {"file", "line"} or {"file", "row"}."""
        if ": row " in self.source:
            file, row = self.source.rsplit(": row ", 1)
            return {"file": file, "row": int(row)}
        file, _, line = self.source.rpartition(":")
        return {"file": file, "line": int(line)} if line.isdigit() else {"file": self.source or None}

    @property
    def prompt(self) -> str:
        """The content of the last user message (the question being asked)."""
        for message in reversed(self.messages):
            if message["role"] == "user":
                return message["content"]
        return self.messages[-1]["content"]


# --- public API -------------------------------------------------------------------------


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Load examples from a JSONL, CSV or Parquet file (chosen by the file's extension), or a Hugging Face
    dataset: a `save_to_disk` folder or `hf:NAME[:SPLIT]` (`distil.data.hf_datasets`).

    Args:
        path: the data file, dataset folder or hf: name.

    Returns:
        The examples, in file order.

    Raises:
        DistilError: the file is missing, unreadable, empty, or a row is malformed.
    """
    file = os.fspath(path)
    return [_to_example(raw, file, where) for where, raw in read_table(file)]


def read_table(path: str | os.PathLike) -> list[tuple[dict, dict]]:
    """(where, row) pairs of a JSONL / CSV / Parquet file or a dataset; `where` is {"line": n} or {"row": n}.

    Raises:
        DistilError: the file is missing, unreadable, of another type, or has no rows.
    """
    file = os.fspath(path)
    if is_dataset_source(file):
        rows = list(_read_dataset(file))
        if not rows:
            raise DistilError("no examples: the dataset has no rows", file=file)
        return rows
    _check_readable(file)
    suffix = Path(file).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        reader = _read_jsonl
    elif suffix == ".csv":
        reader = _read_csv
    elif suffix == ".parquet":
        reader = _read_parquet
    else:
        raise DistilError(f"unsupported file type {suffix or '(no extension)'!r}: "
                          "expected .jsonl, .csv or .parquet", file=file)
    rows = list(reader(file))
    if not rows:
        raise DistilError("no examples: the file has no rows", file=file)
    return rows


def format_prompt(tokenizer, messages: Sequence[dict], system_prompt: str | None = None) -> str:
    """Render a chat as the text a model continues from.

    With a chat template, this is the template's output with the generation prompt added
    (the assistant turn is opened). Without one, the message contents are joined by
    newlines and a final newline is added.

    Args:
        tokenizer: a Hugging Face tokenizer (or None for plain text).
        messages: OpenAI-style messages, e.g. `Example.messages`.
        system_prompt: a system message to put first, unless the chat already has one.

    Returns:
        The prompt text.
    """
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt is not None and not any(m["role"] == "system" for m in chat):
        chat.insert(0, {"role": "system", "content": system_prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in chat) + "\n"


# --- readers: each yields (where, raw row) with where = {"line": n} or {"row": n} ----------


def _check_readable(file: str) -> None:
    """Fail early, with a clear message, on a missing path, a directory or no permission."""
    path = Path(file)
    if not path.exists():
        raise DistilError("file not found", file=file)
    if path.is_dir():
        raise DistilError("is a directory, expected a data file or a folder written by datasets' save_to_disk",
                          file=file)
    if not os.access(path, os.R_OK):
        raise DistilError("cannot read the file (permission denied)", file=file)


def _open_binary(file: str):
    try:
        return open(file, "rb")
    except OSError as e:
        raise DistilError(f"cannot read the file: {_one_line(e.strerror or str(e))}",
                          file=file) from e


def _decoded_lines(file: str) -> Iterator[str]:
    """The file's physical lines as text (line endings kept), decoded one by one.

    Decoding per line lets a bad byte be reported with its line number.
    """
    with _open_binary(file) as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DistilError(f"not valid UTF-8 (byte {e.start + 1} of the line); "
                                  "save the file as UTF-8", file=file, line=number) from e
            if number == 1:
                text = text.removeprefix("\ufeff")  # a BOM, as written by Excel and others
            yield text


def _read_jsonl(file: str) -> Iterator[tuple[dict, dict]]:
    for number, text in enumerate(_decoded_lines(file), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DistilError(f"invalid JSON: {e.msg} (column {e.colno})",
                              file=file, line=number) from e
        if not isinstance(obj, dict):
            raise DistilError(f"expected a JSON object, got {_kind(obj)}", file=file, line=number)
        yield {"line": number}, obj


def _read_csv(file: str) -> Iterator[tuple[dict, dict]]:
    # csv.reader's line_num counts the lines it has pulled from the iterator, so the line
    # a row starts on is one past where the previous row ended (quoted cells may span lines).
    reader = csv.reader(_decoded_lines(file))
    header = next(reader, None)
    if header is None:
        return
    columns = [name.strip() for name in header]
    if "prompt" not in columns and "messages" not in columns:
        raise DistilError(f'CSV header needs a "prompt" or "messages" column; '
                          f"found {', '.join(columns) or 'none'}",
                          file=file, line=1, field="prompt")
    end_of_previous = reader.line_num
    for cells in reader:
        start = end_of_previous + 1
        end_of_previous = reader.line_num
        if not cells or all(not cell.strip() for cell in cells):
            continue  # blank line
        if len(cells) != len(columns):
            raise DistilError(f"row has {len(cells)} cells but the header has {len(columns)} "
                              "(a comma in an unquoted cell?)", file=file, line=start)
        # An empty cell means "missing"; a messages cell holds the chat as JSON text.
        row = {name: cell for name, cell in zip(columns, cells) if cell != ""}
        if "messages" in row:
            row["messages"] = _parse_json_cell(row["messages"], file, {"line": start})
        yield {"line": start}, row


def _read_parquet(file: str) -> Iterator[tuple[dict, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise DistilError(f"cannot read as Parquet: {_one_line(str(e))}", file=file) from e
    wanted, messages_as_text = _checked_columns(schema, file)
    number = 0
    try:
        batches = parquet.iter_batches(columns=wanted)
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                row = {k: v for k, v in row.items() if v is not None}
                if messages_as_text and "messages" in row:
                    row["messages"] = _parse_json_cell(row["messages"], file, {"row": number})
                yield {"row": number}, row
    except pa.ArrowException as e:
        raise DistilError(f"cannot read as Parquet: {_one_line(str(e))}",
                          file=file, row=number + 1) from e


def _checked_columns(schema, file: str) -> tuple[list[str], bool]:
    """The columns to read from a table of prompts (its pyarrow schema), and whether "messages" holds JSON text.

    Column types are checked up front: one clear error instead of one per row."""
    names = set(schema.names)
    if "prompt" not in names and "messages" not in names:
        raise DistilError(f'needs a "prompt" or "messages" column; found {", ".join(schema.names)}',
                          file=file, field="prompt")
    for name in ("prompt",) + OPTIONAL_FIELDS:
        if name in names and not _is_string_type(schema.field(name).type):
            raise DistilError(f"expected a string column, got {schema.field(name).type}", file=file, field=name)
    wanted = [n for n in ("prompt", "messages") + OPTIONAL_FIELDS if n in names]
    return wanted, "messages" in names and _is_string_type(schema.field("messages").type)


def _read_dataset(location: str) -> Iterator[tuple[dict, dict]]:
    """A Hugging Face dataset's rows, checked like a Parquet file's columns."""
    dataset = open_dataset(location)
    wanted, messages_as_text = _checked_columns(dataset.data.schema, location)
    for number, row in enumerate(dataset.select_columns(wanted).to_list(), start=1):
        row = {k: v for k, v in row.items() if v is not None}
        if messages_as_text and "messages" in row:
            row["messages"] = _parse_json_cell(row["messages"], location, {"row": number})
        yield {"row": number}, row


def _is_string_type(arrow_type) -> bool:
    import pyarrow as pa

    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or pa.types.is_null(arrow_type))  # an all-null column is just "missing"


def _parse_json_cell(text: str, file: str, where: dict) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DistilError(f"expected a JSON list of messages, got invalid JSON: {e.msg} "
                          f"(character {e.pos + 1})", file=file, field="messages", **where) from e


# --- validation -------------------------------------------------------------------------


def _to_example(raw: dict, file: str, where: dict) -> Example:
    """Check one raw row and build its Example; `where` is {"line": n} or {"row": n}."""

    def fail(field: str, message: str) -> DistilError:
        return DistilError(message, file=file, field=field, **where)

    prompt, messages = raw.get("prompt"), raw.get("messages")
    if prompt is None and messages is None:
        raise fail("prompt", 'missing: each row needs "prompt" (a string) or "messages" (a list)')
    if prompt is not None and messages is not None:
        raise fail("prompt", 'give either "prompt" or "messages", not both')
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise fail("prompt", f"expected a non-empty string, got {_kind(prompt)}")
        chat = ({"role": "user", "content": prompt},)
    else:
        chat = _check_messages(messages, fail)
    size = sum(len(m["content"]) for m in chat)
    if size > MAX_ROW_CHARS:
        raise fail("messages" if messages is not None else "prompt",
                   f"row holds {size:,} characters of text; the limit is {MAX_ROW_CHARS:,}")
    for name in OPTIONAL_FIELDS:
        value = raw.get(name)
        if value is not None and not isinstance(value, str):
            raise fail(name, f"expected a string, got {_kind(value)}")
    source = f"{file}:{where['line']}" if "line" in where else f"{file}: row {where['row']}"
    return Example(messages=chat, reference=raw.get("reference"), category=raw.get("category"),
                   language=raw.get("language"), source=source)


def _check_messages(messages: Any, fail) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise fail("messages", f"expected a non-empty list of messages, got {_kind(messages)}")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise fail(f"messages[{i}]", f'expected an object with "role" and "content", '
                                         f"got {_kind(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role) if isinstance(role, str) else _kind(role)
            raise fail(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}, got {shown}")
        if not isinstance(content, str):
            raise fail(f"messages[{i}].content", f"expected a string, got {_kind(content)}")
        chat.append({"role": role, "content": content})  # other keys (name, ...) are dropped
    return tuple(chat)


def _kind(value: Any) -> str:
    """A short, JSON-flavoured name for a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "empty string" if not value.strip() else "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "empty list" if not value else "list"
    return type(value).__name__


def _one_line(text: str) -> str:
    """Library error texts can span lines; a DistilError message must not."""
    return " ".join(text.split())
