"""Where the teacher cache's shard files live: a local folder, or an fsspec URL (s3://, gs://, az://, ...).

A shard is written so no reader ever sees half of one: in a folder, under a temporary name,
fsynced and renamed (`distil.files.write_atomic`); on an object store, built in memory and
uploaded in one put, which object stores make visible whole or not at all. Credentials and
endpoints come from the store's usual settings (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 or ~/.aws), as with any fsspec tool. URLs need the
`remote-cache` extra (fsspec with s3fs); other stores need their fsspec package (gcsfs, adlfs).

Example:
    >>> store = open_store("s3://bucket/teacher-cache")
    >>> store.write("shard-1.parquet", lambda f: pq.write_table(table, f))
    >>> [store.read_table(p, ["key"]) for p in store.glob("shard-*.parquet")]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distil.errors import DistilError
from distil.files import check_writable, write_atomic


def is_url(location: str | os.PathLike) -> bool:
    """Whether a cache location is an fsspec URL (`proto://...`) rather than a local path."""
    return "://" in str(location) and not str(location).startswith("file://")


def open_store(location: str | os.PathLike) -> "LocalStore | UrlStore":
    """The store for a cache location: a local folder (a path or file:// URL), else an fsspec URL."""
    if is_url(location):
        return UrlStore(str(location))
    return LocalStore(Path(str(location).removeprefix("file://")))


class LocalStore:
    """A local folder (or a shared POSIX mount): atomic by temporary name, fsync and rename."""

    def __init__(self, root: Path):
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def glob(self, pattern: str) -> list[Path]:
        return sorted(self.root.glob(pattern)) if self.root.is_dir() else []

    def read_table(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, columns=columns)

    def metadata(self, path: Path) -> pq.FileMetaData:
        return pq.ParquetFile(path).metadata

    def size(self, path: Path) -> int:
        return path.stat().st_size

    def write(self, name: str, write: Callable[[object], None]) -> Path:
        """`write(target)` fills a file; it appears at root/name whole or not at all."""
        return write_atomic(self.root / name, write)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def check_writable(self, field: str) -> None:
        check_writable(self.root, field)


class UrlStore:
    """An fsspec filesystem at a URL: each shard is one put of the whole file."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:
            raise DistilError(f"a cache at a URL ({url}) needs fsspec: pip install 'distil[remote-cache]'",
                              field="cache") from None
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:  # no package for the protocol, or an unknown protocol
            raise DistilError(f"cannot open {url}: {' '.join(str(e).split())}", field="cache") from None
        self.root = self.root.rstrip("/")
        self.url = url.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def glob(self, pattern: str) -> list[str]:
        self.fs.invalidate_cache(self.root)  # other writers add shards: list afresh
        try:
            return sorted(self.fs.glob(f"{self.root}/{pattern}"))
        except FileNotFoundError:
            return []

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def metadata(self, path: str) -> pq.FileMetaData:
        with self.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata

    def size(self, path: str) -> int:
        return self.fs.size(path)

    def write(self, name: str, write: Callable[[object], None]) -> str:
        """`write(buffer)` fills an in-memory file, uploaded in one put (visible whole or not at all)."""
        buffer = pa.BufferOutputStream()
        write(buffer)
        path = f"{self.root}/{name}"
        self.fs.pipe_file(path, buffer.getvalue().to_pybytes())
        return path

    def remove(self, path: str) -> None:
        self.fs.rm_file(path)

    def check_writable(self, field: str) -> None:
        """Fail before any work when the store cannot be written (no bucket, no credentials)."""
        probe = f"{self.root}/.distil-write-test-{os.getpid()}"
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as e:  # each store has its own error types (botocore's, aiohttp's, ...)
            raise DistilError(f"cannot write to {self.url}: {' '.join(str(e).split())[:300]}", field=field) from None
