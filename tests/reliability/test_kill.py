"""`kill -9` at seeded random moments during `distil generate` and `distil train` loses nothing.

After each kill the same command is re-run to completion. Then the teacher cache holds exactly
the uninterrupted run's row keys (and rows), each once, in readable shards with no temporaries
left; and training ends with exactly the uninterrupted run's weights.

Quick by default (2 kills of each); `pytest --reliability-full` runs 12 of each (24 in all).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import PROMPT_WORDS, REPO, tiny_recipe_dict, write_jsonl
from safetensors.torch import load_file


def _prompts(n: int) -> list[str]:
    seen = []
    for i in range(10 * n):
        words = [PROMPT_WORDS[(i * 17 + j * 11) % len(PROMPT_WORDS)] for j in range(3 + (i * 5) % 10)]
        text = " ".join(words) + "?"
        if text not in seen:
            seen.append(text)
        if len(seen) == n:
            return seen
    raise AssertionError("not enough distinct prompts")


@pytest.fixture
def kill_recipe(tmp_path, tiny_model_dir):
    """A recipe with 96 train prompts in batches of 4 (many shards) and 120 training steps."""
    prompts = _prompts(104)
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"prompt": p} for p in prompts[:96]])
    write_jsonl(data / "eval.jsonl", [{"prompt": p} for p in prompts[96:]])
    recipe = tiny_recipe_dict(tiny_model_dir, tmp_path)
    recipe["generate"].update(batch_size=4, max_new_tokens=8)
    recipe["train"].update(steps=120, checkpoint_every=3)
    recipe["eval"]["baseline"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distil.cli", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _complete(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _work_window(cmd: list[str], started) -> float:
    """Run `cmd` to completion; seconds from `started()` turning true (the work under way) to the end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    while proc.poll() is None and not started():
        time.sleep(0.01)
    t = time.time()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return time.time() - t


def _kill_during(cmd: list[str], started, delay: float) -> bool:
    """Start `cmd`; once `started()` is true, wait `delay` s and SIGKILL it. True if it was still running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=REPO)
    while proc.poll() is None and not started():
        time.sleep(0.005)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _has(folder: Path, pattern: str):
    return lambda: folder.is_dir() and any(folder.glob(pattern))


def _cache_state(cache: Path) -> dict:
    """key -> token ids over all shards; fails on an unreadable shard, a duplicate key or a temporary."""
    rows, leftovers = {}, [p.name for p in cache.iterdir() if not p.name.endswith(".parquet")]
    assert not leftovers, f"files other than shards left in the cache: {leftovers}"
    for shard in sorted(cache.glob("*.parquet")):
        table = pq.read_table(shard)  # raises on a corrupt shard
        for key, tokens in zip(table.column("key").to_pylist(), table.column("token_ids").to_pylist()):
            assert key not in rows, f"row {key} stored twice"
            rows[key] = tokens
    return rows


def test_kill_during_generate_and_train_loses_nothing(kill_recipe, tmp_path, reliability_full):
    trials = 12 if reliability_full else 2
    rng = random.Random(20261126)
    ref_cache, ref_out = tmp_path / "ref-cache", tmp_path / "ref-out"
    # The kill lands at a uniform moment of the work itself (after the first shard or checkpoint
    # appears), not of the interpreter's start-up, which is most of a tiny run's time.
    gen_window = _work_window(_cli("generate", str(kill_recipe), f"cache={ref_cache}"), _has(ref_cache, "*.parquet"))
    reference_rows = _cache_state(ref_cache)
    assert len(reference_rows) == 104
    train_cmd = _cli("train", str(kill_recipe), f"cache={ref_cache}", f"out={ref_out}")
    train_window = _work_window(train_cmd, _has(ref_out / "checkpoints" / "student", "step-*"))
    reference_weights = load_file(str(ref_out / "student" / "model.safetensors"))

    log = []
    for trial in range(trials):
        cache = tmp_path / f"cache-{trial}"
        delay = rng.uniform(0, 1) * gen_window
        killed = _kill_during(_cli("generate", str(kill_recipe), f"cache={cache}"), _has(cache, "*.parquet"), delay)
        shards_at_kill = len(list(cache.glob("*.parquet")))
        _complete(_cli("generate", str(kill_recipe), f"cache={cache}"))
        assert _cache_state(cache) == reference_rows, f"generate trial {trial} (kill {delay:.2f}s into the work)"
        log.append({"stage": "generate", "delay_s": round(delay, 3), "killed": killed, "shards_at_kill": shards_at_kill})

    for trial in range(trials):
        out = tmp_path / f"out-{trial}"
        delay = rng.uniform(0, 1) * train_window
        cmd = _cli("train", str(kill_recipe), f"cache={ref_cache}", f"out={out}")
        killed = _kill_during(cmd, _has(out / "checkpoints" / "student", "step-*"), delay)
        checkpoints = sorted(p.name for p in (out / "checkpoints" / "student").glob("step-*"))
        finished = (out / "student" / "distil_train.json").exists()  # killed while exiting
        _complete(cmd + ["--resume"])
        weights = load_file(str(out / "student" / "model.safetensors"))
        assert weights.keys() == reference_weights.keys()
        for name in weights:
            assert torch.equal(weights[name], reference_weights[name]), f"train trial {trial}: {name} differs"
        summary = json.loads((out / "student" / "distil_train.json").read_text())["summary"]
        log.append({"stage": "train", "delay_s": round(delay, 3), "killed": killed,
                    "checkpoints_at_kill": checkpoints, "finished_at_kill": finished,
                    "resumed_from": summary["resumed_from"]})

    killed = [t for t in log if t["killed"]]
    print(json.dumps({"trials": len(log), "killed_mid_run": len(killed), "log": log}))
    # Most kills must land while the command works, or the test proves little.
    assert len(killed) >= len(log) // 2
    train_kills = [t for t in killed if t["stage"] == "train"]
    assert all(t["resumed_from"] > 0 or t["finished_at_kill"] for t in train_kills)
    assert sum(t["resumed_from"] > 0 for t in train_kills) >= len(train_kills) // 2, "kills must land mid-training"
