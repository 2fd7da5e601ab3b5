"""A teacher endpoint that fails 30% of requests at random (429 with Retry-After, 500, 503, a hang
past the timeout, a connection reset, truncated JSON, log-probs missing): every row ends up in the
cache exactly once, with the endpoint's answer. One that is down for good: one clear error, and
the rows already cached are kept.

Quick by default (96 prompts); `pytest --reliability-full` sends 400.
"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import PROMPT_WORDS, tiny_recipe_dict, write_jsonl
from endpoints import FAULTS, ThreadServer, expected_answer, faulty_endpoint
from test_kill import _cache_state, _prompts
from test_remote_teacher import all_rows

from distil import pipeline
from distil.config.loading import load_recipe
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation.view import TeacherPrompts
from distil.models.sources import load_tokenizer


def _recipe(tmp_path, model_dir, url: str, n_prompts: int) -> str:
    prompts = _prompts(n_prompts)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    write_jsonl(data / "train.jsonl", [{"prompt": p} for p in prompts[: n_prompts - 8]])
    write_jsonl(data / "eval.jsonl", [{"prompt": p} for p in prompts[n_prompts - 8:]])
    recipe = tiny_recipe_dict(model_dir, tmp_path)
    recipe["teacher"] = {"type": "openai", "base_url": url, "model": "fake", "local_model": str(model_dir),
                         "top_logprobs": 2, "timeout": 1.0, "max_concurrency": 8, "max_retries": 40}
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_thirty_percent_faults_every_row_exactly_once(tmp_path, tiny_model_dir, distil_home, monkeypatch,
                                                      reliability_full):
    monkeypatch.setattr("distil.generation.teachers.openai.BACKOFF_BASE_S", 0.02)  # the schedule, not the waiting, is tested
    vocab = load_tokenizer(tiny_model_dir).get_vocab()
    words = [w for w in PROMPT_WORDS if w in vocab]
    n = 400 if reliability_full else 96
    app = faulty_endpoint(words, fail_rate=0.3, seed=8, hang_s=3.0)
    with ThreadServer(app) as server:
        recipe = load_recipe(_recipe(tmp_path, tiny_model_dir, server.url, n))
        summary = pipeline.generate(recipe)
    stats = app.state.stats
    faults = sum(stats["faults"].values())
    print(json.dumps({"prompts": n, "requests": stats["requests"], "faults": faults,
                      "by_kind": dict(stats["faults"]), "retries": summary["teacher_usage"]["retries"]}))
    assert set(stats["faults"]) == set(FAULTS)
    assert 0.2 < faults / stats["requests"] < 0.4
    rows = all_rows(recipe.cache_dir)
    train_ex, eval_ex = load_data(recipe)
    view = TeacherPrompts(recipe)
    assert sorted(r["key"] for r in rows) == sorted(view.keys(train_ex + eval_ex))  # each row once
    assert len(_cache_state(recipe.cache_dir)) == n  # readable shards, no temporaries, no duplicates
    by_prompt = {r["prompt"]: r for r in rows}
    for ex, prompt in zip(train_ex + eval_ex, view.prompts(train_ex + eval_ex)):
        assert by_prompt[prompt]["text"] == " ".join(expected_answer(list(ex.messages), words))
        assert len(by_prompt[prompt]["topk_ids"][0]) == 2  # soft targets, also for rows whose first try lacked them
    assert summary["teacher_usage"]["rows_soft_targets"] == n


def test_endpoint_down_for_good_keeps_the_cached_rows(tmp_path, tiny_model_dir, distil_home, monkeypatch):
    monkeypatch.setattr("distil.generation.teachers.openai.BACKOFF_BASE_S", 0.02)
    vocab = load_tokenizer(tiny_model_dir).get_vocab()
    words = [w for w in PROMPT_WORDS if w in vocab]
    app = faulty_endpoint(words, fault_every=None)
    with ThreadServer(app) as server:
        path = _recipe(tmp_path, tiny_model_dir, server.url, 24)
        pipeline.generate(load_recipe(path))
        url = server.url
    before = _cache_state(tmp_path / "cache")
    assert len(before) == 24
    # More prompts, and the server is gone: nothing listens at its address any more.
    data = tmp_path / "data" / "train.jsonl"
    write_jsonl(data, [json.loads(line) for line in data.read_text().splitlines()] +
                [{"prompt": p} for p in _prompts(40)[24:]])
    with pytest.raises(DistilError) as err:
        pipeline.generate(load_recipe(path, [f"teacher.base_url={url}", "teacher.max_retries=2"]))
    assert err.value.field == "teacher.base_url" and "\n" not in str(err.value)
    assert _cache_state(tmp_path / "cache") == before
