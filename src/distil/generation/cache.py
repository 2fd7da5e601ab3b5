"""The teacher cache: what the teacher wrote, with its soft targets, written once and re-used.

A cache is a folder (or an fsspec URL such as s3://bucket/cache, `distil.generation.storage`) of
Parquet shards, one row per (teacher, prompt, generation settings),
keyed by a hash of the three. Shards are written to a temporary name, fsynced and renamed,
so a kill at any moment leaves only whole shards; a temporary file left by a dead writer is
ignored and later removed. Many students and training runs can read the same cache.

On disk (version 2) the soft targets are stored compactly, about 90 bytes per generated
token at top-32 instead of 260: per token, the top-k ids in rank order (uint16 where the
vocabulary fits), the largest log-prob and the tail as float16, and the others as 8-bit
steps of `LOGPROB_STEP` nats, each coded as its difference to the one ranked above (small
numbers that compress well). Rows read back in the shape they were written (`ROW_FIELDS`,
lists of floats, renormalised); version-1 shards (float32 lists) still read.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distil.errors import DistilError, is_disk_full
from distil.files import sha256_text
from distil.generation.storage import LocalStore, open_store

VERSION = 2
LOGPROB_STEP = 1 / 16  # nats per quantization step: a log-prob is off by at most 1/32 (3% of its probability)
ZERO_PROB = 255        # the step code of a log-prob of -inf (a padding entry of an endpoint's short top-k)
SHARD_SECONDS = 30.0   # writers also close a shard after this long, whatever has finished (generate.shard_rows)
COMPRESSION_LEVEL = 9  # zstd; level 9 writes ~7% smaller shards than the default 3 at no noticeable cost here

# The fields of a row, as `TeacherCache.write_shard` takes it and `read` gives it back.
ROW_FIELDS = ("key", "teacher", "prompt", "text", "finish_reason", "prompt_ids", "token_ids", "token_logprobs",
              "topk_ids", "topk_logprobs", "tail_logprob")
TEXT_FIELDS = ROW_FIELDS[:5]

# Version 1 stored rows as they are read; its shards still read.
SCHEMA_V1 = pa.schema([
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


def schema(id_type: pa.DataType) -> pa.Schema:
    """The version-2 shard schema, with token ids stored as `id_type` (uint16 or uint32)."""
    return pa.schema([
        *(SCHEMA_V1.field(name) for name in TEXT_FIELDS),
        ("prompt_ids", pa.list_(id_type)),
        ("token_ids", pa.list_(id_type)),
        ("token_logprobs", pa.list_(pa.float16())),
        ("top_k", pa.uint16()),
        ("topk_ids", pa.list_(id_type)),          # per token, k ids in rank order (flat: tokens x k)
        ("top_logprob", pa.list_(pa.float16())),  # per token, the rank-1 log-prob
        ("topk_step_deltas", pa.list_(pa.uint8())),  # per token, ranks 2..k: steps below rank 1, minus the rank above's
        ("tail_logprob", pa.list_(pa.float16())),
    ], metadata={"distil.cache.version": str(VERSION), "distil.cache.logprob_step": repr(LOGPROB_STEP)})


def encode_row(row: dict) -> dict:
    """A row in the version-2 columns (see the module docstring)."""
    n = len(row["token_ids"])
    k = len(row["topk_ids"][0]) if n else 1  # an empty answer: any k
    ids = np.asarray(row["topk_ids"], dtype=np.int64).reshape(n, k)
    lps = np.asarray(row["topk_logprobs"], dtype=np.float64).reshape(n, k)
    if n and not 0 < k <= 256:
        raise ValueError(f"the cache stores 1 to 256 top-k entries per token, got {k}")
    order = np.argsort(-lps, axis=1, kind="stable")  # rank order (endpoints' lists may come unsorted)
    ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)
    top = lps[:, 0]
    with np.errstate(invalid="ignore"):
        steps = np.clip(np.rint((top[:, None] - lps) / LOGPROB_STEP), 0, ZERO_PROB - 1)
    steps[np.isneginf(lps)] = ZERO_PROB
    steps = np.maximum.accumulate(steps, axis=1).astype(np.int64)  # rank order survives rounding
    deltas = np.diff(steps, axis=1)
    return {**{name: row[name] for name in TEXT_FIELDS}, "prompt_ids": row["prompt_ids"], "token_ids": row["token_ids"],
            "token_logprobs": np.asarray(row["token_logprobs"], dtype=np.float16), "top_k": k,
            "topk_ids": ids.reshape(-1), "top_logprob": top.astype(np.float16),
            "topk_step_deltas": deltas.astype(np.uint8).reshape(-1),
            "tail_logprob": np.asarray(row["tail_logprob"], dtype=np.float16)}


def decode_row(stored: dict, step: float = LOGPROB_STEP) -> dict:
    """A version-2 row read back as `ROW_FIELDS`, its k + 1 probabilities renormalised to sum to 1."""
    n, k = len(stored["token_ids"]), stored["top_k"]
    ids = np.asarray(stored["topk_ids"], dtype=np.int64).reshape(n, k)
    steps = np.zeros((n, k), dtype=np.int64)
    steps[:, 1:] = np.cumsum(np.asarray(stored["topk_step_deltas"], dtype=np.int64).reshape(n, k - 1), axis=1)
    top = np.asarray(stored["top_logprob"], dtype=np.float64)
    lps = np.where(steps == ZERO_PROB, -np.inf, top[:, None] - steps * step)
    tail = np.asarray(stored["tail_logprob"], dtype=np.float64)
    # Rounding leaves the probabilities summing to 1 only within a few percent: make them a distribution.
    norm = np.logaddexp(np.logaddexp.reduce(lps, axis=1), tail) if n else tail
    return {**{name: stored[name] for name in TEXT_FIELDS}, "prompt_ids": list(stored["prompt_ids"]),
            "token_ids": list(stored["token_ids"]),
            "token_logprobs": np.asarray(stored["token_logprobs"], dtype=np.float64).tolist(),
            "topk_ids": ids.tolist(), "topk_logprobs": (lps - norm[:, None]).astype(np.float32).tolist(),
            "tail_logprob": (tail - norm).astype(np.float32).tolist()}


def row_key(teacher_identity: str, prompt: str, settings: dict) -> str:
    """Content address of one cache row: teacher identity + formatted prompt + generation settings."""
    blob = json.dumps({"teacher": teacher_identity, "prompt": prompt, "settings": settings}, sort_keys=True)
    return sha256_text(blob)


def shard_of(key: str, count: int) -> int:
    """Which of `count` generation shards (`distil generate --shard I/N`) a row's key falls in.

    A stable hash (the key is a sha256 hex digest: its first 64 bits), the same on every machine,
    so N machines given shards 0..N-1 each fill their part of one cache without talking.
    """
    return int(key[:16], 16) % count


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shard_rows(table: pa.Table) -> list[dict]:
    """A shard's rows as `ROW_FIELDS` dicts, whichever version wrote it."""
    meta = table.schema.metadata or {}
    version = int(meta.get(b"distil.cache.version", b"1"))
    if version == 1:
        return table.to_pylist()
    if version > VERSION:
        raise pa.ArrowException(f"written by a newer distil (cache version {version}; this one reads up to {VERSION})")
    step = float(meta[b"distil.cache.logprob_step"])
    columns = {name: table.column(name) for name in table.column_names}
    flat = {name: col.to_numpy(zero_copy_only=False) for name, col in columns.items()
            if name in ("topk_ids", "top_logprob", "topk_step_deltas", "tail_logprob", "token_logprobs")}
    plain = table.select([*TEXT_FIELDS, "prompt_ids", "token_ids", "top_k"]).to_pylist()
    return [decode_row({**row, **{name: values[i] for name, values in flat.items()}}, step)
            for i, row in enumerate(plain)]


class TeacherCache:
    """Parquet shards of teacher outputs in a folder or at an fsspec URL (`distil.generation.storage`).

    Example:
        >>> cache = TeacherCache("/tmp/cache")  # or "s3://bucket/teacher-cache"
        >>> cache.write_shard([row, ...])      # rows are dicts with ROW_FIELDS
        >>> rows = cache.read({row["key"]})
    """

    def __init__(self, root: str | os.PathLike, compact: bool = True):
        self.store = open_store(root)
        self.root = self.store.root
        self.compact = compact  # write version 2 (else version 1, float32: exact soft targets)

    def shards(self) -> list:
        return self.store.glob("shard-*.parquet")

    def _readable(self, path, columns: list[str] | None = None) -> pa.Table | None:
        try:
            return self.store.read_table(path, columns)
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
            if keys is not None:
                table = table.filter(pc.is_in(table.column("key"), pa.array(sorted(keys), pa.string())))
            try:
                shard_rows = _shard_rows(table)
            except pa.ArrowException as e:
                warnings.warn(f"teacher cache: skipping unreadable shard {shard}: {e}")
                continue
            for row in shard_rows:
                rows.setdefault(row["key"], row)
        return rows

    def size_bytes(self) -> int:
        return sum(self.store.size(p) for p in self.shards())

    def stats(self) -> dict:
        """Rows, generated tokens, bytes, bytes per generated token and its parts (per stored column)."""
        rows = tokens = 0
        parts: dict[str, int] = {}
        for shard in self.shards():
            try:
                meta = self.store.metadata(shard)
                lengths = pc.list_value_length(self.store.read_table(shard, ["token_ids"]).column("token_ids"))
            except (pa.ArrowException, OSError):
                continue
            rows += meta.num_rows
            tokens += pc.sum(lengths).as_py() or 0
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for c in range(group.num_columns):
                    column = group.column(c)
                    name = column.path_in_schema.split(".")[0]
                    parts[name] = parts.get(name, 0) + column.total_compressed_size
        size = self.size_bytes()
        per_token = {name: round(b / tokens, 1) for name, b in parts.items()} if tokens else {}
        return {"rows": rows, "tokens": tokens, "bytes": size,
                "bytes_per_token": round(size / tokens, 1) if tokens else None, "bytes_per_token_parts": per_token}

    def remove_stale_temporaries(self) -> None:
        """Delete temporary shards whose writing process is gone (a kill mid-write; folders only: a URL
        store uploads each shard in one put and leaves no temporaries)."""
        for tmp in self.store.glob(".shard-*.tmp") if isinstance(self.store, LocalStore) else []:
            try:
                pid = int(tmp.name.split(".")[-2].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                tmp.unlink(missing_ok=True)

    def write_shard(self, rows: list[dict]):
        """Write rows as one new shard, atomically (a folder: temp file, fsync, rename; a URL: one put)."""
        name = f"shard-{uuid.uuid4().hex[:16]}.parquet"
        if self.compact:
            wide = any(max(r["prompt_ids"], default=0) >= 2 ** 16 or max(r["token_ids"], default=0) >= 2 ** 16
                       or max((max(t) for t in r["topk_ids"] if t), default=0) >= 2 ** 16 for r in rows)
            table = pa.Table.from_pylist([encode_row(r) for r in rows],
                                         schema=schema(pa.uint32() if wide else pa.uint16()))
        else:
            table = pa.Table.from_pylist(rows, schema=SCHEMA_V1)
        try:
            return self.store.write(name, lambda target: pq.write_table(table, target, compression="zstd",
                                                                       compression_level=COMPRESSION_LEVEL))
        except OSError as e:
            reason = "disk full" if is_disk_full(e) else e.strerror or str(e)
            raise DistilError(f"cannot write teacher cache shard ({reason}); rows already cached are intact",
                              file=f"{self.store}/{name}") from None
