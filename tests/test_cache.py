"""Tests for the teacher cache (distil.cache) and `generate` on the tiny teacher."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from distil import pipeline
from distil.generation.cache import LOGPROB_STEP, ROW_FIELDS, SCHEMA_V1, TeacherCache, row_key
from distil.generation.view import generation_settings

SETTINGS = {"max_new_tokens": 6, "do_sample": False, "top_k": 8, "max_prompt_tokens": 256}


def fake_row(key: str, n_tokens: int = 3, k: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    topk = np.sort(rng.uniform(-6, -1, size=(n_tokens, k)), axis=1)[:, ::-1]
    tail = np.log1p(-np.exp(topk).sum(1))
    return {"key": key, "teacher": "tiny", "prompt": f"prompt {key}", "text": "a b c", "finish_reason": "length",
            "prompt_ids": [1, 2, 3], "token_ids": list(range(10, 10 + n_tokens)),
            "token_logprobs": topk[:, 0].tolist(),
            "topk_ids": rng.integers(0, 100, size=(n_tokens, k)).tolist(),
            "topk_logprobs": topk.tolist(), "tail_logprob": tail.tolist()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- keys ------------------------------------------------------------------------------------


def test_row_key_depends_on_teacher_prompt_and_settings():
    base = row_key("teacher-a", "hello", SETTINGS)
    assert base == row_key("teacher-a", "hello", dict(reversed(list(SETTINGS.items()))))  # order-free
    assert base != row_key("teacher-b", "hello", SETTINGS)
    assert base != row_key("teacher-a", "hello!", SETTINGS)
    assert base != row_key("teacher-a", "hello", {**SETTINGS, "top_k": 16})
    assert base != row_key("teacher-a", "hello", {**SETTINGS, "max_new_tokens": 7})
    assert len(base) == 64 and int(base, 16) >= 0


def test_generation_settings_key_only_what_changes_the_output(load):
    greedy = generation_settings(load())
    assert "batch_size" not in greedy  # batching does not change what the teacher writes
    assert generation_settings(load("generate.batch_size=1")) == greedy
    assert generation_settings(load("generate.top_k=4")) != greedy
    assert generation_settings(load("generate.do_sample=true")) != greedy
    sampled = generation_settings(load("generate.do_sample=true", "generate.seed=1"))
    assert sampled != generation_settings(load("generate.do_sample=true", "generate.seed=2"))


# --- shards -----------------------------------------------------------------------------------


def test_write_shard_round_trip(tmp_path):
    cache = TeacherCache(tmp_path / "cache")
    assert cache.keys() == set() and cache.read() == {} and cache.size_bytes() == 0
    rows = [fake_row(f"k{i}", n_tokens=2 + i, seed=i) for i in range(3)]
    path = cache.write_shard(rows[:2])
    cache.write_shard(rows[2:])
    assert path.exists() and path.name.startswith("shard-") and path.suffix == ".parquet"
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    assert cache.keys() == {"k0", "k1", "k2"}
    assert cache.size_bytes() > 0
    got = cache.read()
    assert set(got) == {"k0", "k1", "k2"}
    for row in rows:
        back = got[row["key"]]
        assert set(back) == set(ROW_FIELDS)
        for name in ("key", "teacher", "prompt", "text", "finish_reason", "prompt_ids", "token_ids", "topk_ids"):
            assert back[name] == row[name], name
        np.testing.assert_allclose(back["token_logprobs"], row["token_logprobs"], rtol=1e-3)  # float16
        assert_same_targets(back, row)
    assert set(cache.read({"k1"})) == {"k1"}
    assert cache.read({"nope"}) == {}


def assert_same_targets(back: dict, row: dict) -> None:
    """Read-back soft targets equal the written ones up to the 8-bit step (half a step either way, plus
    float16 rounding of the largest), after one shift per token that makes them sum to 1 with the tail."""
    got = np.column_stack([np.array(back["topk_logprobs"]), back["tail_logprob"]]).astype(np.float64)
    want = np.column_stack([np.array(row["topk_logprobs"]), row["tail_logprob"]])
    np.testing.assert_allclose(np.exp(got).sum(1), 1.0, atol=1e-5)
    finite = np.isfinite(want)
    assert (np.isfinite(got) == finite).all(), "zero-probability entries stay exactly zero"
    shift = np.log(np.exp(want).sum(1))[:, None]  # the renormalisation of the written values
    err = np.where(finite, got - (want - shift), 0.0)
    err -= err[:, :1]  # one per-token offset (the rounding of the largest) is allowed
    assert np.abs(err[:, :-1]).max() <= LOGPROB_STEP / 2 + 0.01
    assert np.abs(err[:, -1]).max() <= 0.02  # the tail: float16


def test_quantized_targets_stay_within_half_a_step_and_keep_rank_order(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(40, 500))
    logprobs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    order = np.argsort(-logprobs, 1)[:, :16]
    topk = np.take_along_axis(logprobs, order, 1)
    tail = np.log1p(-np.exp(topk).sum(1))
    shuffle = rng.permutation(16)  # an endpoint may list its top-k in any order
    row = {**fake_row("r"), "token_ids": order[:, 0].tolist(), "token_logprobs": topk[:, 0].tolist(),
           "topk_ids": order[:, shuffle].tolist(), "topk_logprobs": topk[:, shuffle].tolist(), "tail_logprob": tail.tolist()}
    cache = TeacherCache(tmp_path)
    cache.write_shard([row])
    back = cache.read()["r"]
    assert back["topk_ids"] == order.tolist(), "read back in rank order"
    assert_same_targets(back, {**row, "topk_ids": order.tolist(), "topk_logprobs": topk.tolist()})
    # The KL from the written to the read-back distribution is what the quantization costs a student.
    p = np.column_stack([topk, tail])
    q = np.column_stack([np.array(back["topk_logprobs"]), back["tail_logprob"]])
    assert (np.exp(p) * (p - q)).sum(1).max() < 1e-3


def test_padded_top_k_and_one_hot_rows_keep_their_zeros(tmp_path):
    """Endpoint rows: a short top-k padded with -inf, and text-only rows (one-hot, empty tail)."""
    inf = float("-inf")
    row = {**fake_row("pad", n_tokens=2, k=4), "topk_ids": [[5, 9, 0, 1], [7, 0, 1, 2]],
           "topk_logprobs": [[-0.1, -2.5, inf, inf], [0.0, inf, inf, inf]], "tail_logprob": [-4.0, inf],
           "token_ids": [5, 7]}
    cache = TeacherCache(tmp_path)
    cache.write_shard([row, {**fake_row("empty"), "token_ids": [], "token_logprobs": [], "topk_ids": [],
                             "topk_logprobs": [], "tail_logprob": []}])
    got = cache.read()
    back = got["pad"]
    assert back["topk_ids"] == row["topk_ids"]
    assert np.isneginf(back["topk_logprobs"][0][2:]).all() and np.isneginf(back["topk_logprobs"][1][1:]).all()
    assert back["topk_logprobs"][1][0] == 0.0 and back["tail_logprob"][1] == inf
    assert got["empty"]["token_ids"] == [] and got["empty"]["topk_ids"] == []


def test_ids_past_uint16_are_stored_wide(tmp_path):
    row = {**fake_row("wide", n_tokens=2, k=2), "topk_ids": [[262_000, 3], [70_000, 65_536]], "token_ids": [262_000, 70_000]}
    cache = TeacherCache(tmp_path)
    cache.write_shard([row])
    back = cache.read()["wide"]
    assert back["topk_ids"] == row["topk_ids"] and back["token_ids"] == row["token_ids"]


def test_a_version_1_shard_still_reads(tmp_path):
    """Caches written before version 2 (float32 lists, no version in the metadata) read as they were."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [fake_row(f"old{i}", seed=i) for i in range(2)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA_V1), tmp_path / "shard-0000000000000001.parquet")
    cache = TeacherCache(tmp_path)
    cache.write_shard([fake_row("new")])
    got = cache.read()
    assert set(got) == {"old0", "old1", "new"}
    for row in rows:
        back = got[row["key"]]
        for name in ROW_FIELDS:
            if isinstance(row[name], str) or name in ("prompt_ids", "token_ids", "topk_ids"):
                assert back[name] == row[name], name
            else:  # float32 as written
                np.testing.assert_allclose(np.array(back[name]), np.array(row[name]), rtol=1e-6, err_msg=name)


def test_stats_count_tokens_and_bytes_per_part(tmp_path):
    cache = TeacherCache(tmp_path)
    cache.write_shard([fake_row("a", n_tokens=5), fake_row("b", n_tokens=7)])
    stats = cache.stats()
    assert stats["rows"] == 2 and stats["tokens"] == 12 and stats["bytes"] == cache.size_bytes()
    assert stats["bytes_per_token"] == round(stats["bytes"] / 12, 1)
    assert {"topk_ids", "topk_step_deltas", "tail_logprob"} <= set(stats["bytes_per_token_parts"])
    assert sum(stats["bytes_per_token_parts"].values()) < stats["bytes_per_token"]  # the rest: footers, metadata


def test_duplicate_key_keeps_one_row(tmp_path):
    cache = TeacherCache(tmp_path)
    cache.write_shard([fake_row("k", seed=1)])
    cache.write_shard([fake_row("k", seed=2)])
    assert cache.keys() == {"k"} and len(cache.read()) == 1


def test_half_written_and_garbage_shards_are_ignored(tmp_path):
    cache = TeacherCache(tmp_path)
    good = cache.write_shard([fake_row("good")])
    data = good.read_bytes()
    stale = tmp_path / f".shard-0123456789abcdef.{dead_pid()}.tmp"
    stale.write_bytes(data[: len(data) // 2])  # a writer killed mid-write
    live = tmp_path / f".shard-fedcba9876543210.{__import__('os').getpid()}.tmp"
    live.write_bytes(data[:10])  # a writer still at work (this process)
    (tmp_path / "shard-bad.parquet").write_bytes(b"this is not parquet" * 10)
    (tmp_path / "shard-trunc.parquet").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cache.keys() == {"good"}
        assert set(cache.read()) == {"good"}
    cache.remove_stale_temporaries()
    assert not stale.exists(), "a dead writer's temporary shard is removed"
    assert live.exists(), "a live writer's temporary shard is left alone"
    assert good.exists()


def test_unreadable_shard_warns_not_raises(tmp_path):
    cache = TeacherCache(tmp_path)
    (tmp_path / "shard-bad.parquet").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="shard-bad"):
        assert cache.keys() == set()


def test_missing_cache_folder_is_empty(tmp_path):
    cache = TeacherCache(tmp_path / "absent")
    cache.remove_stale_temporaries()
    assert cache.keys() == set() and cache.read() == {} and cache.shards() == []


# --- generate on the tiny teacher ------------------------------------------------------------------


def shard_keys(cache: TeacherCache) -> dict:
    import pyarrow.parquet as pq

    return {p: set(pq.read_table(p, columns=["key"]).column("key").to_pylist()) for p in cache.shards()}


def test_generate_twice_then_regenerate_one_deleted_shard(load):
    recipe = load()
    first = pipeline.generate(recipe)
    assert first["rows"] == 32 and first["generated"] == 32 and first["cached_before"] == 0
    assert first["tokens"] > 0
    cache = TeacherCache(recipe.cache_dir)
    assert len(cache.keys()) == 32
    by_shard = shard_keys(cache)
    assert len(by_shard) == 4  # 32 prompts, a shard per 8 finished rows (generate.shard_rows)

    second = pipeline.generate(recipe)
    assert second["generated"] == 0 and second["cached_before"] == 32
    assert shard_keys(cache) == by_shard  # nothing rewritten

    victim, lost = next(iter(by_shard.items()))
    victim.unlink()
    before = cache.read()
    third = pipeline.generate(recipe)
    assert third["generated"] == len(lost) and third["cached_before"] == 32 - len(lost)
    now = shard_keys(cache)
    new = [keys for path, keys in now.items() if path not in by_shard]
    assert new == [lost]
    # Every key is back, and rows that were not lost are untouched.
    after = cache.read()
    assert set(after) == set(before) | lost
    for key in before:
        assert after[key]["token_ids"] == before[key]["token_ids"]


def test_generate_rows_are_consistent(load):
    recipe = load()
    pipeline.generate(recipe)
    rows = list(TeacherCache(recipe.cache_dir).read().values())
    assert len(rows) == 32
    stopped = 0
    for row in rows:
        n = len(row["token_ids"])
        assert 1 <= n <= 6
        assert len(row["token_logprobs"]) == len(row["topk_ids"]) == len(row["topk_logprobs"]) == len(row["tail_logprob"]) == n
        topk = np.array(row["topk_logprobs"], dtype=np.float64)
        assert topk.shape == (n, 8)
        assert np.all(np.diff(topk, axis=1) <= 1e-6), "top-k log-probs are sorted, best first"
        # Greedy: the chosen token is the top-1 and its log-prob is the top-1 log-prob (both stored as
        # float16, the top-k renormalised after quantization: docs/benchmarks.md measures the cost).
        assert [ids[0] for ids in row["topk_ids"]] == row["token_ids"]
        np.testing.assert_allclose(row["token_logprobs"], topk[:, 0], atol=0.01)
        # The tail is the log of the mass outside the top-k.
        expected_tail = np.log(1 - np.exp(topk).sum(1))
        np.testing.assert_allclose(row["tail_logprob"], expected_tail, atol=1e-4)
        if row["finish_reason"] == "stop":
            stopped += 1
            assert row["token_ids"][-1] == 3  # <|im_end|>
        else:
            assert row["finish_reason"] == "length" and n == 6
        assert row["prompt"].startswith("<|im_start|>user\n") and row["prompt"].endswith("<|im_start|>assistant\n")
    # The tiny teacher stops early on some rows and not others, so dropping finished rows is exercised.
    assert 0 < stopped < len(rows)


# The decoding loop's tests compare log-probs to 1e-4: with float32 rows (the compact cache's cost is
# tested on its own above).
EXACT = "generate.cache_format=float32"

# A system prompt gives every chat prompt a long shared head: generate_batch then prefills it once.
SYSTEM = "data.system_prompt=please answer the question in one two three words, thanks"
SYSTEM_PROMPTS = pytest.mark.parametrize("system", [None, SYSTEM], ids=["plain", "shared-prefix"])


@SYSTEM_PROMPTS
def test_generation_is_batch_invariant(load, tmp_path, system):
    """Left padding and position ids: a row's output must not depend on its batch neighbours."""
    extra = [system] if system else []
    extra.append(EXACT)
    one = load("generate.batch_size=1", "generate.shard_rows=1", f"cache={tmp_path / 'cache-b1'}", *extra)
    eight = load("generate.batch_size=8", f"cache={tmp_path / 'cache-b8'}", *extra)
    pipeline.generate(one)
    pipeline.generate(eight)
    rows1 = TeacherCache(one.cache_dir).read()
    rows8 = TeacherCache(eight.cache_dir).read()
    assert set(rows1) == set(rows8) and len(rows1) == 32
    assert len(TeacherCache(one.cache_dir).shards()) == 32
    for key in rows1:
        a, b = rows1[key], rows8[key]
        assert a["prompt_ids"] == b["prompt_ids"]
        assert a["token_ids"] == b["token_ids"], key
        assert a["finish_reason"] == b["finish_reason"]
        assert a["topk_ids"] == b["topk_ids"]
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1e-4)
        np.testing.assert_allclose(a["tail_logprob"], b["tail_logprob"], atol=1e-4)


@SYSTEM_PROMPTS
def test_generate_matches_full_forward(load, tiny_model_dir, system):
    """The KV-cached loop's log-probs equal a plain full-sequence forward over prompt + answer."""
    import torch

    from distil.models.sources import load_causal_lm

    recipe = load(EXACT, *([system] if system else []))
    pipeline.generate(recipe)
    model = load_causal_lm(tiny_model_dir, device="cpu")
    rows = list(TeacherCache(recipe.cache_dir).read().values())
    if system:
        assert all(r["prompt"].startswith("<|im_start|>system\nplease answer") for r in rows)
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["token_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        start = len(row["prompt_ids"]) - 1
        for j, tok in enumerate(row["token_ids"]):
            lp = logprobs[start + j]
            assert int(lp.argmax()) == tok
            assert math.isclose(float(lp[tok]), row["token_logprobs"][j], abs_tol=1e-4)
