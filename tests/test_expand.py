"""data.expand: the teacher writes more training prompts like the given ones, cached like its answers."""

from __future__ import annotations

import json

import pytest
from endpoints import ThreadServer, expected_answer, faulty_endpoint
from test_remote_teacher import remote_recipe, words  # noqa: F401  (the fixture)

from distil import pipeline
from distil.config.loading import load_recipe
from distil.data.examples import Example
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation import expand
from distil.generation.view import TeacherPrompts
from distil.training.runs import run_fingerprint


def example(prompt: str, category: str | None = None) -> Example:
    return Example(messages=({"role": "user", "content": prompt},), category=category)


def test_requests_show_prompts_of_one_category_and_keep_its_share():
    train = [example(f"food question {i}", "food") for i in range(6)] + [example(f"sky question {i}", "sky") for i in range(3)]
    asked = expand.requests(train, 18, 2, seed=0)
    assert len(asked) == 18 and asked == expand.requests(train, 18, 2, seed=0)  # the seed decides
    assert [r.category for r in asked].count("food") == 12 and [r.category for r in asked].count("sky") == 6
    for r in asked:
        shown = [line[2:] for line in r.messages[0]["content"].splitlines() if line.startswith("- ")]
        assert len(shown) == 2 == len(set(shown)) and all(s.startswith(f"{r.category} question") for s in shown)
    assert expand.requests(train, 18, 2, seed=1) != asked


def test_written_prompts_drop_unfinished_repeated_and_held_out_ones(load, monkeypatch):
    recipe = load("data.expand=7", "data.expand_shots=2")
    train, held_out = load_data(recipe)
    answers = [("- How do bees sleep?", "stop"), ('"How do bees sleep?"', "stop"),  # a repeat once cleaned
               ("What is the tallest tree", "length"),  # not finished
               (held_out[0].messages[-1]["content"].upper(), "stop"),  # a held-out prompt
               (train[3].messages[-1]["content"], "stop"),  # a training prompt
               ("x" * 301, "stop"), ("Why is snow white?", "stop")]
    monkeypatch.setattr(expand, "cached_rows", lambda r, keys, split: [{"text": t, "finish_reason": f} for t, f in answers])
    written = expand.written_prompts(recipe, train, held_out)
    assert [w.messages[0]["content"] for w in written] == ["How do bees sleep?", "Why is snow white?"]
    assert [w.source for w in written] == ["data.expand: row 0", "data.expand: row 6"]


def test_expand_needs_one_teacher(recipe_path, tmp_path):
    import yaml

    data = yaml.safe_load(recipe_path.read_text())
    teacher = data.pop("teacher")
    data["teachers"] = [{"name": "a", **teacher}, {"name": "b", **teacher}]
    data["data"]["expand"] = 4
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DistilError) as e:
        load_recipe(path)
    assert e.value.field == "data.expand"


@pytest.mark.slow
def test_the_teacher_writes_prompts_answers_them_and_the_student_trains_on_them(recipe_path, words):  # noqa: F811
    app = faulty_endpoint(words, fault_every=None)
    with ThreadServer(app) as server:
        recipe = load_recipe(remote_recipe(recipe_path, server.url, model="fake", top_logprobs=2),
                             ["data.expand=10", "data.expand_shots=3"])
        summary = pipeline.generate(recipe)
        asked = expand.requests(*[load_data(recipe)[0]], 10, 3, recipe.generate.seed)
        # The fake teacher answers a chat with three words drawn from its last message.
        wanted = list(dict.fromkeys(" ".join(expected_answer(r.messages, words)) for r in asked))
        assert summary["expand"]["generated"] == 10 and summary["expand"]["written"] == len(wanted) >= 8
        train_ex, eval_ex = pipeline.training_examples(recipe)
        assert [ex.messages[0]["content"] for ex in train_ex[24:]] == wanted and len(train_ex) == 24 + len(wanted)
        assert summary["rows"] == 24 + len(wanted) + 8 == summary["generated"]  # the written prompts answered too
        assert app.state.stats["answered"][wanted[0]] == 1
        requests_before = app.state.stats["requests"]
        again = pipeline.generate(recipe)  # all cached: nothing asked again
        assert again["generated"] == 0 and again["expand"]["generated"] == 0
        assert app.state.stats["requests"] == requests_before
    recipe = load_recipe(remote_recipe(recipe_path, server.url, model="fake", top_logprobs=2),
                         ["data.expand=10", "data.expand_shots=3", "train.baseline=false"])
    assert pipeline.train(recipe)["student"]["steps"] == 6
    marker = json.loads((recipe.out_dir / "student" / "distil_train.json").read_text())
    keys = TeacherPrompts(recipe).keys(train_ex)  # the written prompts' rows are training rows
    assert marker["fingerprint"] == run_fingerprint(recipe, keys, recipe.train.alpha)
    assert marker["fingerprint"] != run_fingerprint(recipe, keys[:24], recipe.train.alpha)
