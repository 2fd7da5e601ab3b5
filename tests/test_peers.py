"""bench/peers end to end on the tiny offline teacher: every row trains, in its own process, and is scored."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from conftest import REPO, tiny_recipe_dict

pytest.importorskip("trl")
sys.path.insert(0, str(REPO))

from bench.peers import run  # noqa: E402
from bench.peers.trainers import ROWS  # noqa: E402


@pytest.mark.slow
def test_every_row_trains_and_is_scored(tmp_path, tiny_model_dir, prompts_files, distil_home, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, tmp_path)))
    work = tmp_path / "work"
    common = ["--work", str(work), "--recipe", str(base), "--steps", "3", "--batch-size", "4", "--warmup", "1",
              "--max-train", "24", "--layers", "0,3"]
    results = run.main(common + ["--plot", str(tmp_path / "peers.png")])

    assert list(results["rows"]) == ROWS
    assert results["train_rows"] == 24 and results["held_out_rows"] == 8
    init = results["init"]
    for name, r in results["rows"].items():
        assert r["steps"] == 3, name
        assert r["peak_rss_mb"] > 50 and r["loop_s"] > 0 and r["process_s"] >= r["wall_s"] > 0, name
        q = r["scores"]
        assert 0 <= q["top1_agreement"] <= 1 and 0 <= q["distinct_answers"] <= 1 and 0 <= q["token_f1"] <= 1, name
        assert q["full_vocab_kl"] > 0 and q["teacher_kl"] > 0 and q["perplexity"] > 1, name
        assert q != init, f"{name} did not change the student"  # it trained (the same start for every row)
    # distil's rows read the cache the teacher wrote once: they share its generation time
    distil_rows = [n for n in ROWS if n.startswith("distil")]
    gen = results["generate_s"]
    assert all(results["rows"][n]["generate_amortised_s"] < gen for n in distil_rows)
    assert results["rows"]["trl-distillation"]["generate_s"] == 0
    assert (tmp_path / "peers.png").stat().st_size > 0

    # one row again, with a recipe override: it replaces nothing else and the others keep their scores
    again = run.main(common + ["--rows", "", "--variant", "distil-supervised/betas=train.adam_betas=[0.9,0.999]"])
    assert set(again["rows"]) == set(ROWS) | {"distil-supervised/betas"}
    assert again["rows"]["trl-sft"]["scores"] == results["rows"]["trl-sft"]["scores"]
    assert again["rows"]["distil-supervised/betas"]["scores"] != results["rows"]["distil-supervised"]["scores"]
    assert json.loads((work / "results.json").read_text())["rows"].keys() == again["rows"].keys()
