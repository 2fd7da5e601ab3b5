"""`distil generate --shard I/N`: N writers fill one cache between them, each the rows whose key falls in its shard."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from distil import pipeline
from distil.cli import parse_shard
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation.cache import TeacherCache, shard_of
from distil.generation.view import TeacherPrompts


def all_keys(recipe) -> list[str]:
    train, held_out = load_data(recipe)
    return TeacherPrompts(recipe).keys(train + held_out)


def test_shard_of_is_a_stable_hash_of_the_key():
    assert shard_of("0" * 15 + "7" + "f" * 48, 4) == 3 and shard_of("ff" * 32, 1) == 0
    import hashlib

    counts = [0, 0, 0]
    for i in range(3000):
        counts[shard_of(hashlib.sha256(str(i).encode()).hexdigest(), 3)] += 1
    assert all(900 < c < 1100 for c in counts), counts  # about a third each


def test_two_shards_fill_the_cache_a_single_run_writes(load, tmp_path):
    recipe = load()
    keys = all_keys(recipe)
    first = pipeline.generate(recipe, shard=(0, 2))
    mine = {k for k in keys if shard_of(k, 2) == 0}
    assert 0 < len(mine) < len(keys)  # the tiny data's 32 keys fall in both shards
    assert first["shard"] == "0/2" and first["rows"] == first["generated"] == len(mine)
    assert TeacherCache(recipe.cache_dir).keys() == mine  # nothing of shard 1 was written
    second = pipeline.generate(recipe, shard=(1, 2))
    assert second["generated"] == len(keys) - len(mine)
    assert pipeline.generate(recipe)["generated"] == 0  # together they are the whole cache

    single = load(f"cache={tmp_path / 'single-cache'}")
    pipeline.generate(single)
    assert TeacherCache(recipe.cache_dir).read() == TeacherCache(single.cache_dir).read()  # row for row


def test_a_rerun_of_one_shard_fills_its_gaps(load):
    recipe = load()
    pipeline.generate(recipe, shard=(1, 3))
    cache = TeacherCache(recipe.cache_dir)
    before = cache.keys()
    lost = cache.shards()[0]
    gone = set(pq.read_table(lost, columns=["key"])["key"].to_pylist())
    lost.unlink()  # a machine died after writing some shards, or one was lost
    again = pipeline.generate(recipe, shard=(1, 3))
    assert again["generated"] == len(gone) and again["cached_before"] == len(before) - len(gone)
    assert cache.keys() == before


def test_bad_shard_is_one_error_naming_the_option(recipe_path):
    for text in ("2/2", "-1/2", "0/0", "1", "a/b", "1/2/3", ""):
        with pytest.raises(DistilError) as e:
            parse_shard(text)
        assert e.value.field == "--shard" and "expected I/N" in str(e.value)
    assert parse_shard("3/4") == (3, 4)
    proc = run_cli("generate", str(recipe_path), "--shard", "4/4")
    assert proc.returncode == 2 and "--shard" in proc.stderr and "expected I/N" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
