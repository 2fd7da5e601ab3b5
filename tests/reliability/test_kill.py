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
    """`n` distinct prompts of different lengths: a few words, then i's digits in base len(PROMPT_WORDS)."""
    prompts = []
    for i in range(n):
        words = [PROMPT_WORDS[(i * 17 + j * 11) % len(PROMPT_WORDS)] for j in range(2 + (i * 5) % 8)]
        digits, rest = [], i
        while True:
            rest, d = divmod(rest, len(PROMPT_WORDS))
            digits.append(PROMPT_WORDS[d])
            if rest == 0:
                break
        prompts.append(" ".join(words + ["please"] + digits) + "?")
    assert len(set(prompts)) == n
    return prompts


@pytest.fixture
def kill_recipe(tmp_path, tiny_model_dir):
    """A recipe with 96 train prompts in batches of 4, a shard per 4 rows (26 shards), and 120 training steps."""
    prompts = _prompts(104)
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"prompt": p} for p in prompts[:96]])
    write_jsonl(data / "eval.jsonl", [{"prompt": p} for p in prompts[96:]])
    recipe = tiny_recipe_dict(tiny_model_dir, tmp_path)
    recipe["generate"].update(batch_size=4, shard_rows=4, max_new_tokens=8)
    recipe["train"].update(steps=120, checkpoint_every=3)
    recipe["train"]["baseline"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distil.cli", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _complete(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_when(cmd: list[str], reached, jitter: float) -> bool:
    """Start `cmd`; once `reached()` is true, wait `jitter` s and SIGKILL it. True if it was still running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=REPO)
    while proc.poll() is None and not reached():
        time.sleep(0.002)
    try:
        proc.wait(timeout=jitter)
        return False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _count_at_least(folder: Path, pattern: str, n: int):
    return lambda: folder.is_dir() and len(list(folder.glob(pattern))) >= n


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


@pytest.mark.slow
def test_kill_during_generate_and_train_loses_nothing(kill_recipe, tmp_path, reliability_full):
    trials = 12 if reliability_full else 2
    rng = random.Random(20261126)
    ref_cache, ref_out = tmp_path / "ref-cache", tmp_path / "ref-out"
    _complete(_cli("generate", str(kill_recipe), f"cache={ref_cache}"))
    reference_rows = _cache_state(ref_cache)
    assert len(reference_rows) == 104
    _complete(_cli("train", str(kill_recipe), f"cache={ref_cache}", f"out={ref_out}"))
    reference_weights = load_file(str(ref_out / "student" / "model.safetensors"))

    # Each kill lands at a random point of the work, whatever the machine's speed: once the
    # run has written a random number of shards (of 26) or reached a random checkpoint (of 39),
    # plus a random 0-400 ms (several steps or shards: kills also land mid-write).
    log = []
    for trial in range(trials):
        cache = tmp_path / f"cache-{trial}"
        shards, jitter = rng.randint(1, 25), rng.uniform(0, 0.4)
        killed = _kill_when(_cli("generate", str(kill_recipe), f"cache={cache}"),
                            _count_at_least(cache, "*.parquet", shards), jitter)
        shards_at_kill = len(list(cache.glob("*.parquet")))
        _complete(_cli("generate", str(kill_recipe), f"cache={cache}"))
        assert _cache_state(cache) == reference_rows, f"generate trial {trial} (kill after {shards} shards)"
        log.append({"stage": "generate", "after_shards": shards, "jitter_s": round(jitter, 3), "killed": killed,
                    "shards_at_kill": shards_at_kill})

    for trial in range(trials):
        out = tmp_path / f"out-{trial}"
        step, jitter = 3 * rng.randint(1, 38), rng.uniform(0, 0.4)
        cmd = _cli("train", str(kill_recipe), f"cache={ref_cache}", f"out={out}")
        killed = _kill_when(cmd, lambda: (out / "checkpoints" / "student" / f"step-{step:07d}").exists(), jitter)
        checkpoints = sorted(p.name for p in (out / "checkpoints" / "student").glob("step-*"))
        finished = (out / "student" / "distil_train.json").exists()
        _complete(cmd + ["--resume"])
        weights = load_file(str(out / "student" / "model.safetensors"))
        assert weights.keys() == reference_weights.keys()
        for name in weights:
            assert torch.equal(weights[name], reference_weights[name]), f"train trial {trial}: {name} differs"
        summary = json.loads((out / "student" / "distil_train.json").read_text())["summary"]
        log.append({"stage": "train", "after_step": step, "jitter_s": round(jitter, 3), "killed": killed,
                    "checkpoints_at_kill": checkpoints, "finished_at_kill": finished,
                    "resumed_from": summary["resumed_from"]})

    killed = [t for t in log if t["killed"]]
    print(json.dumps({"trials": len(log), "killed_mid_run": len(killed), "log": log}))
    # The kills must land while the command works, or the test proves little.
    assert len(killed) >= len(log) - 1
    train_kills = [t for t in killed if t["stage"] == "train"]
    assert all(t["resumed_from"] > 0 for t in train_kills), "kills must land mid-training"
