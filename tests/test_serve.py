"""`distil serve` over real loopback HTTP, driven by the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest
from endpoints import ServeProcess

KEY = "test-key"
MODEL = "tiny-llama"
CHAT = [{"role": "user", "content": "what is the best way to learn a new language ?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = ServeProcess(tiny_model_dir, "--api-key", KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_with_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens >= 1
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely token
        assert bytes(entry.bytes).decode() == entry.token
    assert " ".join(e.token for e in content) == choice.message.content
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 6


def test_completions_with_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="hello cat dog", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert r.usage.prompt_tokens == 3


def test_streaming_equals_the_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    plain = client.completions.create(model=MODEL, prompt="tell me about stars", max_tokens=5, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt="tell me about stars", max_tokens=5, temperature=0,
                                         stream=True, logprobs=1)
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text
    assert sum(len(p.choices[0].logprobs.tokens) for p in pieces if p.choices[0].logprobs) == plain.usage.completion_tokens


def test_seed_makes_sampling_repeatable_and_stop_cuts(client):
    ask = dict(model=MODEL, messages=CHAT, max_tokens=10, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=7, **ask).choices[0].message.content
    b = client.chat.completions.create(seed=7, **ask).choices[0].message.content
    assert a == b
    full = client.completions.create(model=MODEL, prompt="hello cat dog", max_tokens=6, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3
    cut = client.completions.create(model=MODEL, prompt="hello cat dog", max_tokens=6, temperature=0, stop=[words[2]])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.find(words[2])]


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.get(f"{server.url}/models")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_limits_answer_4xx_in_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=100_000)
    assert e.value.body["param"] == "max_tokens"
    long_prompt = " ".join(["cat"] * 400)  # the tiny model takes 256 positions
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    huge = b'{"model": "tiny-llama", "prompt": "' + b"a" * (2 << 20) + b'"}'
    r = httpx.post(f"{server.url}/completions", content=huge, headers=headers, timeout=60)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(f"{server.url}/completions", content=b'{"model": "tiny', headers=headers)
    assert r.status_code == 400 and "error" in r.json()
    # curl -d sends a form Content-Type: the JSON body is still read
    r = httpx.post(f"{server.url}/completions", content=b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 1}',
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 1


def test_concurrent_requests_are_batched_and_match_solo_answers(client, server):
    prompts = [f"count {w} numbers please" for w in ("one", "two", "three", "four", "five", "cat", "dog", "fish")]
    solo = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0).choices[0].text
            for p in prompts[:3]}

    def ask(i):
        p = prompts[i % len(prompts)]
        if i % 4 == 3:  # a sampled request, and a streamed one, among the greedy ones
            return None, client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0.8).choices[0].text
        if i % 4 == 2:
            return p, "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=p, max_tokens=5, temperature=0, stream=True))
        return p, client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0).choices[0].text

    health = server.url.removesuffix("/v1") + "/health"
    before = httpx.get(health).json()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(32)))
    assert len(results) == 32
    after = httpx.get(health).json()
    assert after["requests"] - before["requests"] == 32 and after["batches"] - before["batches"] <= 32
    for p, text in results:
        if p in solo:
            assert text == solo[p]
    # and the server is still fine afterwards
    assert client.models.list().data[0].id == MODEL


def test_odd_values_are_4xx_not_5xx(client, server):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, seed=2 ** 70)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=1e-9, seed=-5)
    assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=3)
    with pytest.raises(openai.BadRequestError) as e:  # fits alone, but not with the answer
        client.completions.create(model=MODEL, prompt=" ".join(["cat"] * 200), max_tokens=100)
    assert e.value.body["code"] == "context_length_exceeded"
    r = httpx.get(f"{server.url}/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def _jobs(engine, loop, n: int, max_tokens: int = 4):
    import asyncio

    from distil.serving.server import Job

    ids = engine.encode("hello cat dog")
    return [Job(prompt_ids=ids, max_tokens=max_tokens, temperature=0, top_p=1, seed=None, stops=[], top_logprobs=0,
                loop=loop, events=asyncio.Queue()) for _ in range(n)]


def test_full_queue_answers_503(tiny_model_dir, monkeypatch):
    import asyncio

    from distil.serving.server import APIError, Engine, Limits, load_engine

    monkeypatch.setattr(Engine, "_loop", lambda self: None)  # a worker that never takes a job: the queue only fills
    engine = load_engine(str(tiny_model_dir), limits=Limits(max_queue=2))
    loop = asyncio.new_event_loop()
    first, second, third = _jobs(engine, loop, 3)
    engine.submit(first)
    engine.submit(second)
    with pytest.raises(APIError) as e:
        engine.submit(third)
    loop.close()
    assert (e.value.status, e.value.headers) == (503, {"Retry-After": "1"})


def test_requests_waiting_together_share_one_batch(tiny_model_dir):
    import asyncio

    from distil.serving.server import Limits, load_engine

    engine = load_engine(str(tiny_model_dir), limits=Limits(batch_wait_s=1.0))

    async def run():
        jobs = _jobs(engine, asyncio.get_running_loop(), 8)
        for job in jobs:
            engine.submit(job)
        for job in jobs:
            while (await job.events.get())[0] != "done":
                pass
        return jobs

    jobs = asyncio.run(run())
    assert engine.stats == {"requests": 8, "batches": 1, "largest_batch": 8}
    assert len({tuple(j.kept) for j in jobs}) == 1  # the same greedy answer in every row


def test_client_leaving_mid_stream_frees_the_server(client, server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "hello cat dog", "max_tokens": 200, "temperature": 0, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", f"{server.url}/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up
    r = client.completions.create(model=MODEL, prompt="hello cat dog", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert httpx.get(server.url.removesuffix("/v1") + "/health").json()["queued"] == 0


def test_random_bodies_never_get_a_5xx(tiny_model_dir):
    """Fuzz both POST routes with well- and ill-formed bodies: every answer is a 2xx or a 4xx."""
    from endpoints import ThreadServer
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from distil.serving.server import Limits, create_app, load_engine

    text = st.text(max_size=12)
    number = st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True), st.none(), text)
    message = st.one_of(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant",
                                                                                   "developer", "tool"]), text),
                                               "content": st.one_of(text, st.none(), st.lists(
                                                   st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                                          "text": text}), max_size=2))}),
                        text, st.integers())
    body = st.fixed_dictionaries({"model": st.one_of(st.just(MODEL), text)}, optional={
        "messages": st.one_of(st.lists(message, max_size=3), text),
        "prompt": st.one_of(text, st.lists(st.integers(-5, 400), max_size=5), st.lists(text, max_size=2)),
        "max_tokens": number, "max_completion_tokens": number, "temperature": number, "top_p": number,
        "stop": st.one_of(text, st.lists(text, max_size=6), st.integers()), "seed": st.integers(-2 ** 70, 2 ** 70),
        "stream": st.one_of(st.booleans(), text), "logprobs": st.one_of(st.booleans(), st.integers(-2, 30)),
        "top_logprobs": st.integers(-2, 30), "n": st.integers(0, 3), "echo": st.booleans(),
        "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()}))})

    engine = load_engine(str(tiny_model_dir), limits=Limits(max_tokens=16))
    with ThreadServer(create_app(engine)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(route=st.sampled_from(["/chat/completions", "/completions"]), payload=body)
        def check(route, payload):
            r = http.post(route, content=json.dumps(payload), headers={"Content-Type": "application/json"})  # NaN too
            assert r.status_code < 500, (route, payload, r.text[:300])
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            else:
                r.read()

        check()
