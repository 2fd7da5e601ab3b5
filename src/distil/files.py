"""Files written so a crash never leaves half of one, and content hashes.

Every file or folder distil writes for later use (cache shards, checkpoints, model folders,
report.json) goes through `write_atomic`: written under a temporary name in the same folder,
fsynced, renamed over the final name, then the folder fsynced, so a kill at any moment leaves
either the old version or the new one. Hashes that address cached work come from here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from distil.errors import DistilError

TMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """A sibling of `path` no other writer uses: `.NAME.PID-RANDOM.tmp` (the PID tells whether its writer lives)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` (which creates a file or a folder at tmp), then put it at `path` atomically.

    The written file (or every file of the written folder) is fsynced, renamed over `path` and the
    parent folder fsynced. A folder already at `path` is replaced. If `write` fails, the temporary
    is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        _fsync_tree(tmp)
        if path.is_dir() and not path.is_symlink():  # os.replace cannot put a folder over a non-empty one
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` at `path`, atomically, with the mode a plain write would give (not mkstemp's 0600)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data) -> Path:
    """`data` as indented JSON at `path`, atomically."""
    return write_text(path, json.dumps(data, indent=2, default=str))


def remove(path: Path) -> None:
    """Remove a file or folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if path.is_dir():
        fsync_dir(path)


def check_writable(folder: Path, field: str) -> None:
    """Fail before any work if `folder` cannot be created or written (a file in the way, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".distil-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DistilError(f"cannot write to this folder: {e.strerror or e}", file=str(folder), field=field) from None


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(*parts) -> str:
    """sha256 of the JSON of `parts` (sorted keys): the content address of cached or trained work."""
    return sha256_text(json.dumps(parts, sort_keys=True, default=str))


def tensor_digest(*tensors) -> str:
    """sha256 of torch tensors' shapes, dtypes and bytes: the content address of in-memory data."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
