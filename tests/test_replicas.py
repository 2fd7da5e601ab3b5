"""Replicas of one endpoint teacher (`teacher.base_url` as a list): least-loaded first, a failing one sits out."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PROMPT_WORDS, write_jsonl
from endpoints import ServeProcess, ThreadServer, faulty_endpoint
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from distil import pipeline
from distil.config.loading import load_recipe
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation.cache import TeacherCache
from distil.generation.teachers.replicas import ReplicaPool
from distil.generation.view import TeacherPrompts


def cached_keys(cache_dir) -> list[str]:
    """Every row's key in every shard, repeats kept (TeacherCache.read would fold them)."""
    return [k for shard in TeacherCache(cache_dir).shards() for k in pq.read_table(shard, columns=["key"])["key"].to_pylist()]


def replica_recipe(recipe_path, urls, model="fake", n_prompts: int | None = None, **teacher) -> str:
    """The tiny recipe with an endpoint teacher on `urls`; with `n_prompts`, that many training prompts."""
    data = yaml.safe_load(recipe_path.read_text())
    data["teacher"] = {"type": "openai", "base_url": urls, "model": model, "local_model": data["teacher"]["model"],
                       "top_logprobs": 2, **teacher}
    data["cache"] = str(recipe_path.parent / f"cache-{len(urls)}-replicas")
    if n_prompts:
        rng = random.Random(0)
        prompts = sorted({" ".join(rng.choices(PROMPT_WORDS, k=rng.randint(3, 9))) + "?" for _ in range(2 * n_prompts)})
        rng.shuffle(prompts)
        write_jsonl(recipe_path.parent / "data" / "many.jsonl", [{"prompt": p} for p in prompts[:n_prompts]])
        data["data"]["train"] = "data/many.jsonl"
    path = recipe_path.parent / f"replicas-{len(urls)}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def expected_keys(recipe) -> list[str]:
    train, held_out = load_data(recipe)
    return TeacherPrompts(recipe).keys(train + held_out)


@pytest.fixture
def words(tiny_model_dir):
    from distil.models.sources import load_tokenizer

    vocab = load_tokenizer(tiny_model_dir).get_vocab()
    return [w for w in PROMPT_WORDS if w in vocab]


# --- the pool on its own, with a clock the test moves --------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_pool_picks_least_loaded_and_sits_out_a_failing_replica():
    clock = Clock()
    pool = ReplicaPool(["http://a/v1", "http://b/v1/", "http://c/v1"], per_replica=2, cooldown=30, clock=clock)
    a, b, c = pool.replicas
    assert b.url == "http://b/v1/"
    a.in_flight, b.in_flight, c.in_flight = 1, 0, 1
    assert pool.pick() is b
    b.in_flight = 1
    c.rows = 5
    assert pool.pick() is a  # equal load: the one that has served fewer rows
    pool.failed(a, "connection (ConnectError)", take_out=True)
    assert pool.pick() is b and a.taken_out == 1 and a.errors == {"connection (ConnectError)": 1}
    pool.failed(b, "HTTP 429", take_out=False)  # a rate limit is no sign of a sick server
    assert b.out_until == 0 and pool.pick() is b
    a.in_flight = 0
    b.in_flight = c.in_flight = 2
    assert pool.pick() is None  # the others are full and a sits out: wait
    clock.now += 30.5
    assert pool.pick() is a  # back after the cool-down ...
    a.in_flight = 1
    assert pool.pick() is None  # ... one request at a time until one succeeds
    pool.succeeded(a)
    assert pool.pick() is a and not a.probing
    assert pool.others_up(a)


def test_pool_with_every_replica_out_still_uses_the_one_back_soonest():
    clock = Clock()
    pool = ReplicaPool(["http://a/v1", "http://b/v1"], per_replica=1, cooldown=10, clock=clock)
    a, b = pool.replicas
    pool.failed(a, "timeout", take_out=True)
    clock.now += 1
    pool.failed(b, "timeout", take_out=True)
    assert pool.pick() is a and not pool.others_up(a)


def test_take_waits_for_room_and_counts_in_flight():
    pool = ReplicaPool(["http://a/v1", "http://b/v1"], per_replica=1, cooldown=5)
    peak = {"a": 0, "b": 0}

    async def one():
        async with pool.take() as r:
            name = r.url[7]
            peak[name] = max(peak[name], r.in_flight)
            await asyncio.sleep(0.01)
            r.rows += 1

    async def main():
        await asyncio.gather(*(one() for _ in range(10)))

    asyncio.run(main())
    assert peak == {"a": 1, "b": 1} and [r.rows for r in pool.replicas] == [5, 5]
    assert all(r.in_flight == 0 for r in pool.replicas)


# --- over loopback HTTP ------------------------------------------------------------------------


def always_500():
    app = FastAPI()
    app.state.requests = 0

    @app.post("/v1/chat/completions")
    async def chat():
        app.state.requests += 1
        return JSONResponse({"error": {"message": "broken", "type": "server_error"}}, status_code=500)

    return app


def test_a_failing_replica_sits_out_and_the_others_answer_every_row(recipe_path, words):
    bad = always_500()
    good = [faulty_endpoint(words, fault_every=None), faulty_endpoint(words, fault_every=None)]
    with ThreadServer(good[0]) as s0, ThreadServer(bad) as s1, ThreadServer(good[1]) as s2:
        recipe = load_recipe(replica_recipe(recipe_path, [s0.url, s1.url, s2.url], max_concurrency=2,
                                            replica_cooldown=60))
        summary = pipeline.generate(recipe)
    assert sorted(cached_keys(recipe.cache_dir)) == sorted(expected_keys(recipe))  # every row, none twice
    replicas = summary["teacher_usage"]["replicas"]
    assert list(replicas) == [s0.url, s1.url, s2.url]
    assert replicas[s1.url]["rows"] == 0 and replicas[s1.url]["errors"] == {"HTTP 500": bad.state.requests}
    # taken out on its first failure and left out for the whole (short) run: at most the requests in flight failed
    assert replicas[s1.url]["taken_out"] == 1 and 1 <= bad.state.requests <= 2
    assert replicas[s0.url]["rows"] + replicas[s2.url]["rows"] == 32
    for url in (s0.url, s2.url):
        assert 0.4 <= replicas[url]["rows"] / 32 <= 0.6, replicas
        assert replicas[url]["completion_tokens"] == 3 * replicas[url]["rows"] and replicas[url]["tokens_per_s"] > 0
    # the running total keeps each replica's rows; the report's Run section shows them as a table
    usage = json.loads((recipe.out_dir / "teacher_usage.json").read_text())
    assert usage["replicas"][s0.url]["rows"] == replicas[s0.url]["rows"]
    from distil.evaluation.report import _run_section

    html = _run_section({"teacher_usage": usage})
    assert "Teacher replicas" in html and s1.url in html


def test_every_replica_down_is_one_clear_error(recipe_path):
    import socket

    ports = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    recipe = load_recipe(replica_recipe(recipe_path, [f"http://127.0.0.1:{p}/v1" for p in ports], max_retries=2))
    with pytest.raises(DistilError) as e:
        pipeline.generate(recipe)
    assert e.value.field == "teacher.base_url" and "2 replicas failed 3 times in a row (last: connection" in str(e.value)


def test_base_url_list_is_checked(load):
    with pytest.raises(DistilError) as e:
        load("teacher.type=openai", "teacher.base_url=[http://a:1/v1, http://a:1/v1/]")
    assert "teacher" in str(e.value) and "listed twice" in str(e.value)
    with pytest.raises(DistilError) as e:
        load("teacher.type=openai", "teacher.base_url=[a.example:8000/v1]")
    assert "base_url: expected an http:// or https:// URL" in str(e.value)
    with pytest.raises(DistilError) as e:
        load("teacher.replica_cooldown=5")
    assert "only apply to type: openai" in str(e.value)


@pytest.mark.slow
def test_three_distil_serve_replicas_one_killed_mid_run(recipe_path, tiny_model_dir):
    """Three `distil serve` processes of the tiny model; one is killed while rows are being answered."""
    servers = [ServeProcess(tiny_model_dir) for _ in range(3)]
    try:
        urls = [s.url for s in servers]
        recipe = load_recipe(replica_recipe(recipe_path, urls, model="tiny-llama", n_prompts=150, max_concurrency=2,
                                            replica_cooldown=1.0, timeout=20))
        want = expected_keys(recipe)
        result: dict = {}
        run = threading.Thread(target=lambda: result.update(summary=pipeline.generate(recipe)))
        run.start()
        deadline = time.time() + 300
        while len(cached_keys(recipe.cache_dir)) < 40 and run.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        at_kill = len(cached_keys(recipe.cache_dir))
        servers[2].proc.kill()
        run.join(300)
        assert not run.is_alive() and "summary" in result
    finally:
        for s in servers:
            s.stop()
    keys = cached_keys(recipe.cache_dir)
    assert sorted(keys) == sorted(want) and len(keys) == len(set(keys)) == 158  # every row exactly once
    assert at_kill < 158 - 40  # the kill came while most rows were still to answer
    replicas = result["summary"]["teacher_usage"]["replicas"]
    killed = replicas[urls[2]]
    assert 0 < killed["rows"] < at_kill + 8 and killed["taken_out"] >= 1
    assert any(reason.startswith("connection") for reason in killed["errors"]), killed
    assert sum(r["rows"] for r in replicas.values()) == 158
    print("replicas, one killed:", json.dumps(replicas))

    # Two healthy replicas, a fresh cache: each serves 40-60% of the rows.
    servers = [ServeProcess(tiny_model_dir) for _ in range(2)]
    try:
        two = load_recipe(replica_recipe(recipe_path, [s.url for s in servers], model="tiny-llama", n_prompts=150,
                                         max_concurrency=2))
        summary = pipeline.generate(two)
    finally:
        for s in servers:
            s.stop()
    assert sorted(cached_keys(two.cache_dir)) == sorted(want)
    shares = [r["rows"] / 158 for r in summary["teacher_usage"]["replicas"].values()]
    print("two healthy replicas, shares:", shares)
    assert all(0.4 <= share <= 0.6 for share in shares), shares
