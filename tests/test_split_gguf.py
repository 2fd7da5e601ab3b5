"""models: a GGUF split into `.partNN` chunks inside a wheel is joined in order and checked."""

from __future__ import annotations

import hashlib

import pytest

from distil.errors import DistilError
from distil.models import sources


def _wheel(folder, payload: bytes, checksum: str | None):
    data = folder / "pkg" / "data"
    data.mkdir(parents=True)
    pieces = [payload[i:i + 7] for i in range(0, len(payload), 7)]
    for i, piece in reversed(list(enumerate(pieces))):  # written out of order: the join sorts by name
        (data / f"m.gguf.part{i:02d}").write_bytes(piece)
    if checksum is not None:
        (data / "SHA256SUMS").write_text(f"{checksum}  m.gguf\n")
    return folder, len(pieces)


def test_chunks_are_joined_in_name_order_and_verified(tmp_path, distil_home):
    payload = bytes(range(256)) * 3
    folder, n = _wheel(tmp_path / "w", payload, hashlib.sha256(payload).hexdigest())
    assert n > 10  # part10 must come after part09
    joined = sources._assemble_split_gguf(folder, "pypi:m==1", "teacher.model")
    assert joined.read_bytes() == payload and joined.parent == distil_home / "wheels" / "assembled" / "m-1"


def test_a_checksum_mismatch_is_a_clear_error(tmp_path, distil_home):
    folder, _ = _wheel(tmp_path / "w", b"not the model" * 5, "0" * 64)
    with pytest.raises(DistilError) as e:
        sources._assemble_split_gguf(folder, "pypi:m==1", "teacher.model")
    assert e.value.field == "teacher.model" and "SHA256SUMS" in e.value.message
    assert not list((distil_home / "wheels" / "assembled").rglob("*m.gguf*"))


def test_pinned_requirements_are_read_from_metadata(tmp_path):
    info = tmp_path / "x-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Name: x\nRequires-Dist: x-part1==1.0.0\nRequires-Dist: numpy>=1\n"
                                   "Requires-Dist: x-part2 ==1.0.0 ; python_version>'3'\n")
    assert sources._required_wheels(tmp_path) == ["x-part1==1.0.0", "x-part2==1.0.0"]
