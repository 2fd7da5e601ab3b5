"""train.report_to: Accelerate's experiment trackers get the metrics the JSONL log holds; TensorBoard read back."""

from __future__ import annotations

import importlib.util
import json

import pytest

from distil import pipeline
from distil.errors import DistilError

pytest.importorskip("tensorboard")


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve in the TensorBoard event files of `folder`, as (step, value) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_jsonl_curves(load):
    recipe = load("train.report_to=[tensorboard]", "train.steps=6", "train.log_every=2")
    pipeline.generate(recipe)
    pipeline.train(recipe)
    logs = recipe.out_dir / "logs"
    for run in ("student", "baseline"):
        lines = jsonl(logs / f"{run}.jsonl")
        assert [line["step"] for line in lines] == [2, 4, 6]
        assert list((logs / run).glob("events.out.tfevents.*")), f"no event file for {run}"
        curves = scalars(logs / run)
        for name in ("loss", "lr", "ce", "kd", "tokens"):
            want = [(line["step"], line[name]) for line in lines]
            got = curves[name]
            assert [s for s, _ in got] == [s for s, _ in want], name
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), name  # float32 in the file
        lrs = [v for _, v in curves["lr"]]
        assert len(set(lrs)) == 3 and lrs[0] > lrs[-1]  # the cosine schedule, not a constant


def test_report_to_does_not_retrain_a_finished_run(load):
    plain = load("train.steps=2", "train.baseline=false")
    pipeline.generate(plain)
    pipeline.train(plain)
    again = pipeline.train(load("train.steps=2", "train.baseline=false", "train.report_to=[tensorboard]"))
    assert again["student"]["skipped"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_not_installed_is_one_error_naming_the_key(load):
    recipe = load("train.report_to=[tensorboard, wandb]", "train.steps=2", "train.baseline=false")
    pipeline.generate(recipe)
    with pytest.raises(DistilError) as e:
        pipeline.train(recipe)
    assert e.value.field == "train.report_to" and "wandb is not installed (pip install wandb)" in str(e.value)


def test_an_unknown_tracker_is_a_recipe_error(load):
    with pytest.raises(DistilError) as e:
        load("train.report_to=[tensorbord]")
    assert "report_to" in str(e.value) and "tensorboard" in str(e.value)
