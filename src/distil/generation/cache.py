"""The teacher cache: what the teacher wrote, with its soft targets, written once and re-used.

A cache is a folder of Parquet shards, one row per (teacher, prompt, generation settings),
keyed by a hash of the three. Shards are written to a temporary name, fsynced and renamed,
so a kill at any moment leaves only whole shards; a temporary file left by a dead writer is
ignored and later removed. Many students and training runs can read the same cache.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distil.errors import DistilError, is_disk_full
from distil.files import sha256_text, write_atomic

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("teacher", pa.string()),
    ("prompt", pa.string()),            # the formatted prompt the teacher saw (chat template applied)
    ("text", pa.string()),              # what the teacher wrote
    ("finish_reason", pa.string()),     # "stop" or "length"
    ("prompt_ids", pa.list_(pa.int32())),
    ("token_ids", pa.list_(pa.int32())),
    ("token_logprobs", pa.list_(pa.float32())),
    ("topk_ids", pa.list_(pa.list_(pa.int32()))),
    ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("tail_logprob", pa.list_(pa.float32())),  # log(1 - sum(exp(topk_logprobs))) per token
])


def row_key(teacher_identity: str, prompt: str, settings: dict) -> str:
    """Content address of one cache row: teacher identity + formatted prompt + generation settings."""
    blob = json.dumps({"teacher": teacher_identity, "prompt": prompt, "settings": settings}, sort_keys=True)
    return sha256_text(blob)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TeacherCache:
    """A folder of Parquet shards of teacher outputs.

    Example:
        >>> cache = TeacherCache("/tmp/cache")
        >>> cache.write_shard([row, ...])      # rows are dicts with SCHEMA's fields
        >>> rows = cache.read({row["key"]})
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def shards(self) -> list[Path]:
        return sorted(self.root.glob("shard-*.parquet")) if self.root.is_dir() else []

    def _readable(self, path: Path, columns: list[str] | None = None) -> pa.Table | None:
        try:
            return pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as e:
            warnings.warn(f"teacher cache: skipping unreadable shard {path}: {e}")
            return None

    def keys(self) -> set[str]:
        """Keys of every row in a readable shard."""
        done: set[str] = set()
        for shard in self.shards():
            table = self._readable(shard, ["key"])
            if table is not None:
                done.update(table.column("key").to_pylist())
        return done

    def read(self, keys: set[str] | None = None) -> dict[str, dict]:
        """Rows by key (all rows when `keys` is None); a key found twice keeps its first row."""
        rows: dict[str, dict] = {}
        for shard in self.shards():
            table = self._readable(shard)
            if table is None:
                continue
            for row in table.to_pylist():
                if (keys is None or row["key"] in keys) and row["key"] not in rows:
                    rows[row["key"]] = row
        return rows

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards())

    def remove_stale_temporaries(self) -> None:
        """Delete temporary shards whose writing process is gone (a kill mid-write)."""
        for tmp in self.root.glob(".shard-*.tmp") if self.root.is_dir() else []:
            try:
                pid = int(tmp.name.split(".")[-2].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                tmp.unlink(missing_ok=True)

    def write_shard(self, rows: list[dict]) -> Path:
        """Write rows as one new shard, atomically: temp file, fsync, rename, fsync the folder."""
        final = self.root / f"shard-{uuid.uuid4().hex[:16]}.parquet"
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        try:
            write_atomic(final, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        except OSError as e:
            reason = "disk full" if is_disk_full(e) else e.strerror or str(e)
            raise DistilError(f"cannot write teacher cache shard ({reason}); rows already cached are intact",
                              file=str(final)) from None
        return final
