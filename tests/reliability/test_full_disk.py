"""A full disk: cache and checkpoint writes fail with one clear error; what is already there
stays valid, and the run completes once space is freed.

Uses a small tmpfs mounted for the test (needs root, as on our CI machine; skipped otherwise).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe_dict, write_jsonl
from safetensors.torch import load_file
from test_kill import _cache_state, _prompts

from distil import cli


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int = 0) -> Path:
    """Fill `disk` until only `leave` bytes are free (about: the file system rounds to pages)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while shutil.disk_usage(disk).free > leave:
                f.write(b"\0" * min(65536, max(4096, shutil.disk_usage(disk).free - leave)))
                f.flush()
        except OSError:
            pass
    return filler


def _main(argv, capsys, monkeypatch) -> tuple[int, str]:
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["distil", *argv])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _error_lines(err: str) -> list[str]:
    """The error lines (in-process, transformers' own loading bars share stderr)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _recipe(tmp_path, model_dir, n_train: int, **top) -> Path:
    prompts = _prompts(n_train + 4)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    write_jsonl(data / "train.jsonl", [{"prompt": p} for p in prompts[:n_train]])
    write_jsonl(data / "eval.jsonl", [{"prompt": p} for p in prompts[n_train:]])
    recipe = tiny_recipe_dict(model_dir, tmp_path)
    recipe["train"]["baseline"] = False
    recipe.update(top)
    path = tmp_path / f"recipe-{n_train}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cache_write_on_a_full_disk(small_disk, tmp_path, tiny_model_dir, distil_home, capsys, monkeypatch):
    cache = small_disk / "cache"
    assert _main(["generate", str(_recipe(tmp_path, tiny_model_dir, 16, cache=str(cache)))], capsys, monkeypatch)[0] == 0
    before = _cache_state(cache)
    filler = _fill(small_disk)

    bigger = _recipe(tmp_path, tiny_model_dir, 40, cache=str(cache))
    code, err = _main(["generate", str(bigger)], capsys, monkeypatch)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "disk full" in lines[0] and str(cache) in lines[0] and "intact" in lines[0], lines[0]
    after = _cache_state(cache)  # every shard readable, no temporaries, no duplicates
    assert before.items() <= after.items()

    filler.unlink()
    assert _main(["generate", str(bigger)], capsys, monkeypatch)[0] == 0
    assert len(_cache_state(cache)) == 44 and before.items() <= _cache_state(cache).items()


def test_checkpoint_write_on_a_full_disk(small_disk, tmp_path, tiny_model_dir, distil_home, capsys, monkeypatch):
    cache = tmp_path / "cache"
    ref = _recipe(tmp_path, tiny_model_dir, 16, cache=str(cache), out=str(tmp_path / "ref"))
    assert _main(["generate", str(ref)], capsys, monkeypatch)[0] == 0
    assert _main(["train", str(ref)], capsys, monkeypatch)[0] == 0
    checkpoint = next((tmp_path / "ref" / "checkpoints" / "student").glob("step-*"))
    one_checkpoint = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())

    out = small_disk / "out"
    recipe = _recipe(tmp_path, tiny_model_dir, 16, cache=str(cache), out=str(out))
    filler = _fill(small_disk, leave=int(1.5 * one_checkpoint))  # room for the first checkpoint only
    code, err = _main(["train", str(recipe)], capsys, monkeypatch)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "disk full" in lines[0] and "checkpoint" in lines[0], lines[0]
    folder = out / "checkpoints" / "student"
    kept = sorted(folder.glob("step-*"))
    assert [p.name for p in kept] == ["step-0000002"], sorted(p.name for p in folder.iterdir())
    assert not list(folder.glob(".*.tmp")), "a half-written checkpoint was left behind"
    load_file(str(kept[0] / "model.safetensors"))
    assert torch.load(kept[0] / "train_state.pt", weights_only=True)["step"] == 2

    filler.unlink()
    assert _main(["train", str(recipe), "--resume"], capsys, monkeypatch)[0] == 0
    a, b = (load_file(str(d / "student" / "model.safetensors")) for d in (tmp_path / "ref", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
