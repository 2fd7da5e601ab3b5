"""The teacher cache at an fsspec URL: an S3-compatible server (moto) on 127.0.0.1, written by sharded generators."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PROMPT_WORDS, REPO, run_cli, write_jsonl

from distil import pipeline
from distil.config.loading import load_recipe
from distil.errors import DistilError
from distil.generation.cache import TeacherCache, shard_of

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free loopback port with bucket `bucket`; yields the env a client needs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import httpx

    httpx.post(f"http://127.0.0.1:{port}/moto-api/reset")  # moto keeps buckets per process: start empty
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bucket")
    yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def keys_in(cache) -> list[str]:
    """Every row's key in every shard, repeats kept."""
    return [k for shard in cache.shards() for k in cache.store.read_table(shard, ["key"])["key"].to_pylist()]


def test_cache_at_an_s3_url_round_trips_and_a_missing_bucket_is_one_error(s3, load):
    recipe = load("cache=s3://bucket/teacher-cache")
    summary = pipeline.generate(recipe)
    assert summary["generated"] == 32 and summary["cache"] == "s3://bucket/teacher-cache"
    remote = TeacherCache("s3://bucket/teacher-cache")
    assert all(p.startswith("bucket/teacher-cache/shard-") for p in remote.shards())
    assert sorted(keys_in(remote)) == sorted(remote.keys()) and len(remote.keys()) == 32
    assert pipeline.generate(recipe)["generated"] == 0  # a rerun reads what is there
    stats = remote.stats()
    assert stats["rows"] == 32 and stats["bytes"] == remote.size_bytes() > 0
    local = load()
    pipeline.generate(local)
    assert remote.read() == TeacherCache(local.cache_dir).read()
    trained = pipeline.train(load("cache=s3://bucket/teacher-cache", "train.steps=2", "train.baseline=false"))
    assert trained["student"]["steps"] == 2  # training reads its rows from the bucket
    with pytest.raises(DistilError) as e:
        pipeline.generate(load("cache=s3://no-such-bucket/cache"))
    assert e.value.field == "cache" and "no-such-bucket" in str(e.value) and "\n" not in str(e.value)


def test_a_cache_url_without_its_filesystem_is_one_error(load):
    with pytest.raises(DistilError) as e:
        pipeline.generate(load("cache=nosuchproto://bucket/cache"))
    assert e.value.field == "cache" and "nosuchproto" in str(e.value)


@pytest.mark.slow
def test_two_sharded_writers_one_killed_fill_the_bucket_as_one_local_run(s3, recipe_path, tmp_path):
    """`distil generate --shard 0/2` and `--shard 1/2` write to s3://bucket/cache; the first is SIGKILLed
    mid-run and re-run: the bucket then holds exactly the rows of a single local run, each once."""
    rng = random.Random(1)
    prompts = sorted({" ".join(rng.choices(PROMPT_WORDS, k=rng.randint(3, 9))) + "?" for _ in range(600)})[:240]
    write_jsonl(tmp_path / "data" / "many.jsonl", [{"prompt": p} for p in prompts])
    data = yaml.safe_load(recipe_path.read_text())
    data["data"]["train"] = "data/many.jsonl"
    # One prompt at a time: a row's floats then cannot depend on its batch neighbours (which differ between a
    # sharded and a single run; test_cache.py shows batching changes them by < 1e-4), so rows compare exactly.
    data["generate"].update(max_new_tokens=16, batch_size=1, shard_rows=2)
    data["cache"] = "s3://bucket/cache"
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, **s3, "OMP_NUM_THREADS": "1"}

    def writer(shard: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "distil.cli", "generate", str(path), "--shard", shard],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))

    bucket = TeacherCache("s3://bucket/cache")
    first, second = writer("0/2"), writer("1/2")
    try:
        deadline = time.time() + 240
        while first.poll() is None and time.time() < deadline:
            if sum(shard_of(k, 2) == 0 for k in bucket.keys()) >= 6:
                break
            time.sleep(0.05)
        assert first.poll() is None, "shard 0 finished before it could be killed: " + first.stderr.read()[-2000:]
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err[-3000:]
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert first.returncode == -signal.SIGKILL
    assert json.loads(out)["shard"] == "1/2"
    kept = [k for k in keys_in(bucket) if shard_of(k, 2) == 0]
    rerun = run_cli("generate", str(path), "--shard", "0/2", env_extra=s3)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["cached_before"] == len(kept) >= 6 and summary["generated"] == summary["rows"] - len(kept) > 0
    print(f"shard 0/2: {len(kept)} of {summary['rows']} rows in the bucket when killed, {summary['generated']} on re-run")

    local = load_recipe(path, [f"cache={tmp_path / 'local-cache'}"])
    assert pipeline.generate(local)["generated"] == 248
    keys = keys_in(bucket)
    assert len(keys) == len(set(keys)) == 248  # every row once: the kill left no half-written object
    assert all(pq.read_table(bucket.store.fs.open(s, "rb")).num_rows > 0 for s in bucket.shards())
    assert bucket.read() == TeacherCache(local.cache_dir).read()  # row for row
