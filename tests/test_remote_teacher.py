"""The OpenAI-compatible teacher over real loopback HTTP: against `distil serve`, and against a faulty endpoint."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import PROMPT_WORDS, run_cli
from endpoints import FAULTS, ServeProcess, ThreadServer, expected_answer, faulty_endpoint

from distil import pipeline
from distil.config.loading import load_recipe
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation.cache import TeacherCache
from distil.generation.view import TeacherPrompts


def remote_recipe(recipe_path, url: str, model: str = "tiny-llama", **teacher) -> str:
    """Rewrite the tiny recipe's teacher as an OpenAI-compatible endpoint (the tiny model is the local copy)."""
    data = yaml.safe_load(recipe_path.read_text())
    local = data["teacher"]["model"]
    data["teacher"] = {"type": "openai", "base_url": url, "model": model, "local_model": local, "top_logprobs": 8,
                       **teacher}
    data["cache"] = str(recipe_path.parent / "remote-cache")
    path = recipe_path.parent / "remote.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def all_rows(cache_dir) -> list[dict]:
    return list(TeacherCache(cache_dir).read().values())


@pytest.mark.slow
def test_generate_against_distil_serve_matches_the_local_teacher(recipe_path, tiny_model_dir):
    server = ServeProcess(tiny_model_dir, "--api-key", "k3y")
    try:
        path = remote_recipe(recipe_path, server.url, api_key_env="TINY_KEY")
        proc = run_cli("generate", path, env_extra={"TINY_KEY": "k3y"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout)
    finally:
        server.stop()
    assert summary["generated"] == summary["rows"] == 32
    usage = summary["teacher_usage"]
    assert usage["rows_soft_targets"] == 32 and usage["rows_text_only"] == 0
    assert usage["completion_tokens"] > 0 and usage["requests"] == 32

    remote = {r["prompt"]: r for r in all_rows(load_recipe(path).cache_dir)}
    assert len(remote) == 32
    pipeline.generate(load_recipe(recipe_path))  # the same tiny model, as a local teacher
    local = {r["prompt"]: r for r in all_rows(load_recipe(recipe_path).cache_dir)}
    assert remote.keys() == local.keys()
    for prompt, r in remote.items():
        lo = local[prompt]
        assert r["text"] == lo["text"] and r["finish_reason"] == lo["finish_reason"]
        assert r["prompt_ids"] == lo["prompt_ids"]
        assert r["token_ids"] == lo["token_ids"]
        # the endpoint leaves out the end-of-turn token: it is stored one-hot, everything before is soft
        n = len(lo["token_ids"]) - (lo["finish_reason"] == "stop")
        for j in range(n):
            assert r["topk_ids"][j] == lo["topk_ids"][j]
            assert r["topk_logprobs"][j] == pytest.approx(lo["topk_logprobs"][j], abs=1e-4)
            assert r["tail_logprob"][j] == pytest.approx(lo["tail_logprob"][j], abs=1e-3)
        if n < len(lo["token_ids"]):
            assert r["topk_logprobs"][n][0] == 0.0 and r["tail_logprob"][n] == -math.inf


@pytest.fixture
def words(tiny_model_dir):
    from distil.models.sources import load_tokenizer

    vocab = load_tokenizer(tiny_model_dir).get_vocab()
    return [w for w in PROMPT_WORDS if w in vocab]


@pytest.mark.slow
def test_faulty_endpoint_every_row_exactly_once(recipe_path, words, monkeypatch):
    monkeypatch.setattr("distil.generation.teachers.openai.BACKOFF_BASE_S", 0.02)  # the schedule, not the waiting, is tested
    app = faulty_endpoint(words, fault_every=12, hang_s=3.0)
    with ThreadServer(app) as server:
        # Retries generous enough that a loaded CI machine (slow good answers) cannot exhaust them.
        recipe = load_recipe(remote_recipe(recipe_path, server.url, model="fake", timeout=1.0, max_concurrency=8, max_retries=40,
                                           top_logprobs=2))
        summary = pipeline.generate(recipe)
    stats = app.state.stats
    assert set(stats["faults"]) == set(FAULTS)
    assert sum(stats["faults"].values()) >= 0.5 * 32  # 7 of every 12 requests failed, every kind of failure
    retries = summary["teacher_usage"]["retries"]
    assert any(r.startswith("HTTP 429") for r in retries) and "timeout" in retries and "unparseable body" in retries
    assert any(r.startswith("connection") for r in retries) and "log-probs missing" in retries
    assert summary["teacher_usage"]["rows_soft_targets"] == 32
    rows = all_rows(recipe.cache_dir)
    expected = TeacherPrompts(recipe).keys(load_data(recipe)[0] + load_data(recipe)[1])
    assert sorted(r["key"] for r in rows) == sorted(expected)  # every row, none twice
    examples = {r["prompt"]: r for r in rows}
    train_ex, eval_ex = load_data(recipe)
    view = TeacherPrompts(recipe)
    for ex, prompt in zip(train_ex + eval_ex, view.prompts(train_ex + eval_ex)):
        row = examples[prompt]
        want = expected_answer(list(ex.messages), words)
        assert row["text"] == " ".join(want)
        assert view.tokenizer.convert_ids_to_tokens(row["token_ids"][:-1]) == want
        assert row["token_ids"][-1] == view.tokenizer.eos_token_id
        # the compact cache keeps log-probs to float16 (rank 1, tail) and 1/16-nat steps (lower ranks)
        assert len(row["topk_ids"][0]) == 2 and row["topk_logprobs"][0][0] == pytest.approx(-0.25, abs=2e-3)
        assert row["tail_logprob"][0] == pytest.approx(math.log(1 - math.exp(-0.25) - math.exp(-2.0)), abs=2e-3)
    # a rerun asks for nothing
    assert pipeline.generate(recipe)["generated"] == 0


@pytest.mark.parametrize("max_retries, soft", [(8, 32), (3, 31)])
def test_log_probs_missing_again_and_again_for_one_row(recipe_path, words, max_retries, soft):
    """An endpoint that sends log-probs but leaves them out 4 times running for one prompt: retried within
    max_retries; when those run out the last reply is kept as text, never failing the run."""
    train_ex, eval_ex = load_data(load_recipe(recipe_path))
    last = (train_ex + eval_ex)[-1].messages[-1]["content"]  # asked last: log-probs have been seen by then
    app = faulty_endpoint(words, fault_every=None, scripted={last: ["no-logprobs"] * 4})
    with ThreadServer(app) as server:
        recipe = load_recipe(remote_recipe(recipe_path, server.url, model="fake", max_concurrency=1,
                                           max_retries=max_retries, top_logprobs=2))
        summary = pipeline.generate(recipe)
    usage = summary["teacher_usage"]
    assert usage["rows_soft_targets"] == soft and usage["rows_text_only"] == 32 - soft
    assert usage["retries"]["log-probs missing"] == min(4, max_retries)
    assert len(TeacherCache(recipe.cache_dir).keys()) == 32


def test_permanent_failure_stops_with_one_error_and_keeps_answered_rows(recipe_path, words):
    app = faulty_endpoint(words, fault_every=None, die_after=5)
    with ThreadServer(app) as server:
        recipe = load_recipe(remote_recipe(recipe_path, server.url, model="fake", max_concurrency=1))
        with pytest.raises(DistilError) as e:
            pipeline.generate(recipe)
    assert "HTTP 401" in str(e.value) and "teacher.base_url" in str(e.value) and "\n" not in str(e.value)
    assert len(all_rows(recipe.cache_dir)) == 5 and len(TeacherCache(recipe.cache_dir).keys()) == 5
    # the endpoint is back (at another address): a rerun asks only for the 27 missing rows
    healthy = faulty_endpoint(words, fault_every=None)
    with ThreadServer(healthy) as server:
        rerun = load_recipe(remote_recipe(recipe_path, server.url, model="fake", max_concurrency=1))
        assert pipeline.generate(rerun)["generated"] == 27
    assert healthy.state.stats["requests"] == 27
    keys = [r["key"] for r in all_rows(recipe.cache_dir)]
    assert len(keys) == len(set(keys)) == 32


def test_endpoint_down_is_one_clear_error(recipe_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    recipe = load_recipe(remote_recipe(recipe_path, f"http://127.0.0.1:{port}/v1", max_retries=1))
    with pytest.raises(DistilError) as e:
        pipeline.generate(recipe)
    assert e.value.field == "teacher.base_url" and "failed 2 times in a row (last: connection" in str(e.value)
    assert "\n" not in str(e.value) and TeacherCache(recipe.cache_dir).keys() == set()


def test_text_only_endpoint_falls_back_to_sequence_level_and_trains(recipe_path, words, capsys):
    app = faulty_endpoint(words, fault_every=None, logprobs=False)
    with ThreadServer(app) as server:
        recipe = load_recipe(remote_recipe(recipe_path, server.url, model="fake", price_input_per_mtok=2.0,
                                           price_output_per_mtok=10.0),
                             ["train.steps=2", "train.baseline=false"])
        summary = pipeline.generate(recipe)
    assert "sequence-level distillation" in summary["distillation"]
    assert "sequence-level" in capsys.readouterr().err
    usage = summary["teacher_usage"]
    assert usage["rows_text_only"] == 32 and usage["rows_soft_targets"] == 0
    assert usage["estimated_cost"] == pytest.approx((32 * 10 * 2.0 + 32 * 3 * 10.0) / 1e6)
    row = all_rows(recipe.cache_dir)[0]
    assert all(lp[0] == 0.0 and all(v == -math.inf for v in lp[1:]) for lp in row["topk_logprobs"])
    assert all(t == -math.inf for t in row["tail_logprob"])
    trained = pipeline.train(recipe)  # one-hot targets: the trainer's KL term becomes cross-entropy
    assert trained["student"]["steps"] == 2 and math.isfinite(trained["student"]["final"]["loss"])
    usage_file = json.loads((recipe.out_dir / "teacher_usage.json").read_text())
    assert usage_file["completion_tokens"] == 96


def test_recipe_keeps_local_default_and_checks_openai_fields(recipe_path, load):
    assert load().teacher.type == "local"
    with pytest.raises(DistilError) as e:
        load("teacher.base_url=http://x/v1")
    assert "only apply to type: openai" in str(e.value)
    with pytest.raises(DistilError) as e:
        load("teacher.type=openai")
    assert "needs base_url" in str(e.value)
    with pytest.raises(DistilError) as e:
        load("teacher.type=openai", "teacher.base_url=http://x/v1", "teacher.max_concurency=3")
    assert "max_concurrency" in str(e.value)


def test_row_builder_maps_tokens_and_folds_unmapped_alternatives_into_the_tail(tiny_model_dir):
    from distil.generation.teachers.openai import Reply, RowBuilder
    from distil.models.sources import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    b = RowBuilder(tok, 3)
    reply = Reply("cat dog", "length", [
        ({"token": "cat", "logprob": -0.1}, [{"token": "cat", "logprob": -0.1}, {"token": "zzz-not-a-token", "logprob": -3.0}]),
        ({"token": "dog", "logprob": -0.5, "bytes": list(b"dog")}, [{"token": "dog", "logprob": -0.5}]),
    ], 3, 2)
    row, soft = b.build(reply)
    assert soft and row["token_ids"] == tok.convert_tokens_to_ids(["cat", "dog"])
    assert row["topk_ids"][0][0] == tok.convert_tokens_to_ids("cat") and len(set(row["topk_ids"][0])) == 3
    assert row["topk_logprobs"][0][1:] == [-math.inf, -math.inf]
    assert row["tail_logprob"][0] == pytest.approx(math.log(1 - math.exp(-0.1)))  # "zzz" went to the tail
    # a chosen token the student tokenizer does not have: the row keeps its text only
    row, soft = b.build(Reply("cat dog", "stop", [({"token": "ca", "logprob": -1.0}, [])], None, None))
    assert not soft and row["token_ids"] == tok.convert_tokens_to_ids(["cat", "dog"]) + [tok.eos_token_id]


def test_completions_endpoint_maps_token_texts(recipe_path, words):
    app = faulty_endpoint(words, fault_every=None)
    with ThreadServer(app) as server:
        recipe = load_recipe(remote_recipe(recipe_path, server.url, model="fake", endpoint="completions", top_logprobs=2))
        summary = pipeline.generate(recipe)
    usage = summary["teacher_usage"]
    assert usage["rows_soft_targets"] == 32
    assert usage["rows_tokens_counted_locally"] == 32 and usage["completion_tokens"] == 32 * 3  # no usage in replies
    view = TeacherPrompts(recipe)
    assert usage["prompt_tokens"] == sum(len(r["prompt_ids"]) for r in all_rows(recipe.cache_dir))
    for row in all_rows(recipe.cache_dir):
        want = expected_answer([{"content": row["prompt"]}], words)
        assert view.tokenizer.convert_ids_to_tokens(row["token_ids"]) == want  # finish "length": no end token added
        assert row["finish_reason"] == "length"
        assert row["topk_logprobs"][0] == pytest.approx([-0.5, -1.5], abs=1e-3)  # the compact cache's float16


def test_rate_limit_and_retry_after():
    import asyncio
    import email.utils
    import time

    from distil.generation.teachers.openai import _RateLimiter, _retry_after

    async def five():
        limiter = _RateLimiter(600)  # one every 0.1 s
        t = time.monotonic()
        for _ in range(5):
            await limiter.wait()
        return time.monotonic() - t

    assert asyncio.run(five()) >= 0.39
    assert _retry_after("0.25") == 0.25 and _retry_after(None) is None and _retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after(later) <= 31
    assert _retry_after("99999") == 300.0  # capped
