"""`distil plan`: its predictions against a real run of the tiny recipe, and the exit-2 path."""

from __future__ import annotations

import json
import time

import pytest

from distil import pipeline
from distil.errors import DistilError
from distil.generation.cache import TeacherCache
from distil.config.recipe import TeacherConfig
from distil.generation.stage import teacher_view
from distil.plan import parse_memory, plan, teacher_cost
from distil.training.memory import parameter_bytes

from conftest import run_cli

# Long enough that timing noise on a shared CPU stays small against the run.
RUN = ("train.steps=80", "train.baseline=false", "train.checkpoint_every=1000")


def test_plan_matches_a_real_run_of_the_tiny_recipe(load):
    recipe = load(*RUN)
    predicted = plan(recipe, steps=10)
    assert not TeacherCache(recipe.cache_dir).keys(), "the calibration must not touch the recipe's cache"
    assert not recipe.out_dir.exists()

    pipeline.generate(recipe)
    stats = TeacherCache(recipe.cache_dir).stats()
    t0 = time.time()
    pipeline.train(recipe)
    train_seconds = time.time() - t0
    print("PLAN", json.dumps({"plan": {k: predicted[k] for k in ("rows", "cache_bytes", "train_seconds", "teacher_tokens", "calibration")},
                      "measured": {"rows": stats["rows"], "cache_bytes": stats["bytes"], "train_seconds": train_seconds,
                                   "tokens": stats["tokens"]}}))
    assert predicted["rows"] == stats["rows"] == 32
    # Two generation batches by default: one batch alone decodes at falling occupancy and undercounts rows/s.
    assert predicted["calibration"]["rows"] == 2 * recipe.generate.batch_size
    assert predicted["cache_bytes"] == pytest.approx(stats["bytes"], rel=0.25)
    assert predicted["teacher_tokens"]["completion"] == pytest.approx(stats["tokens"], rel=0.25)
    # Seconds: within 2x here (a 1-2 s run on a shared 2-core machine moves ~30% between runs: 1.31 s measured
    # against 1.7 s planned in one CI run); the 25% target is measured on full recipes by bench/plan_accuracy.py.
    assert train_seconds / 2 <= predicted["train_seconds"] <= 2 * train_seconds
    mem = predicted["memory_per_device"]
    assert mem["optimizer"] == 2 * mem["gradients"] > 0 and mem["activations"] > 0
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert predicted["cost"] is None  # a local teacher
    # The train process holds the runtime, the teacher the student is built from, and (on the CPU) the device's part.
    rss = predicted["train_peak_rss"]
    assert rss["teacher"] == parameter_bytes(teacher_view(recipe).load_model())[0] > 0
    assert rss["device"] == mem["total"] and rss["runtime"] > 50e6
    assert rss["total"] == rss["runtime"] + rss["teacher"] + rss["device"]


def test_plan_memory_follows_checkpointing_and_mixed_precision(load):
    plain = plan(load(), steps=2)["memory_per_device"]
    ckpt = plan(load("train.gradient_checkpointing=true"), steps=2)["memory_per_device"]
    bf16 = plan(load("train.mixed_precision=bf16"), steps=2)["memory_per_device"]
    assert ckpt["activations"] < 0.7 * plain["activations"]
    assert bf16["activations"] < plain["activations"]
    assert ckpt["weights"] == bf16["weights"] == plain["weights"]


def test_plan_leaves_frozen_embeddings_out_of_gradients_and_optimizer(load):
    plain = plan(load(), steps=2)["memory_per_device"]
    frozen = plan(load("train.freeze_embeddings=true"), steps=2)["memory_per_device"]
    teacher = teacher_view(load()).load_model()  # the student is built from its layers and embeddings
    embeddings = {w.untyped_storage().data_ptr(): w.numel() * w.element_size()
                  for w in (teacher.get_input_embeddings().weight, teacher.get_output_embeddings().weight)}
    assert frozen["weights"] == plain["weights"]
    assert plain["gradients"] - frozen["gradients"] == sum(embeddings.values()) > 0
    assert frozen["optimizer"] == 2 * frozen["gradients"]


def test_plan_exits_2_naming_the_key_when_the_recipe_does_not_fit(recipe_path):
    proc = run_cli("plan", str(recipe_path), "train.steps=3", "--memory", "20KB")
    assert proc.returncode == 2, proc.stderr[-3000:]
    # After the calibration's progress lines, one error line naming the recipe line and key to change.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    assert errors[0].startswith(f"error: {recipe_path}:")
    assert 'field "train.gradient_checkpointing": needs about ' in errors[0]
    assert "more than --memory 0.02 MB (activations " in errors[0]
    fits = run_cli("plan", str(recipe_path), "train.steps=3", "--memory", "80GB")
    assert fits.returncode == 0, fits.stderr[-3000:]
    assert json.loads(fits.stdout)["rows"] == 32


def test_memory_sizes():
    assert parse_memory("24GB") == 24 * 10 ** 9 and parse_memory("1 GiB") == 2 ** 30
    with pytest.raises(DistilError) as e:
        parse_memory("lots")
    assert e.value.field == "--memory"


def test_hosted_teacher_cost():
    hosted = TeacherConfig(type="openai", model="m", base_url="http://127.0.0.1:1/v1", price_input_per_mtok=0.5,
                           price_output_per_mtok=1.5)
    cost = teacher_cost(hosted, 2_000_000, 1_000_000)
    assert cost["usd"] == pytest.approx(2.5) and cost["prompt_tokens"] == 2_000_000
    assert teacher_cost(TeacherConfig(model="local-dir"), 2_000_000, 1_000_000) is None
