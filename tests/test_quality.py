"""Data quality: duplicate prompts, category balance, rejected teacher answers, the report's data section."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from distil import pipeline
from distil.data import quality
from distil.data.examples import Example
from distil.data.splits import checked_answers, load_data_with_stats
from distil.errors import DistilError
from distil.evaluation.report import write_html_report
from distil.generation.cache import TeacherCache
from distil.generation.view import TeacherPrompts


def ex(text: str, category: str | None = None, reference: str | None = None) -> Example:
    return Example(messages=({"role": "user", "content": text},), category=category, reference=reference)


def test_exact_and_near_duplicates_keep_the_first():
    data = [ex("What is the best way to learn a new language quickly?"),
            ex("what is the best   way to learn a new language quickly"),      # exact after normalising
            ex("What is the best way to learn a new language quick?"),        # near
            ex("Tell me about stars, planets and moons."),
            ex("Why is the sky blue?")]
    kept, why = quality.dedupe(data, "exact", 0.8)
    assert [k.prompt for k in kept] == [data[0].prompt, data[2].prompt, data[3].prompt, data[4].prompt]
    assert why == {"exact_duplicate": 1}
    kept, why = quality.dedupe(data, "near", 0.8)
    assert [k.prompt for k in kept] == [data[0].prompt, data[3].prompt, data[4].prompt]
    assert why == {"exact_duplicate": 1, "near_duplicate": 1}
    assert quality.dedupe(data, "none", 0.8)[0] == data
    # the same question in another role is a different chat
    assert len(quality.dedupe([ex("hi"), Example(messages=({"role": "system", "content": "hi"},))], "exact", 0.8)[0]) == 2


def test_near_duplicates_found_by_lsh_match_all_pairs():
    import random

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    base = [" ".join(rng.choices(words, k=12)) for _ in range(60)]
    data = []
    for s in base:  # each sentence, and a copy with one word changed half the time
        data.append(ex(s))
        if rng.random() < 0.5:
            w = s.split()
            w[rng.randrange(len(w))] = rng.choice(words)
            data.append(ex(" ".join(w)))
    kept, _ = quality.dedupe(data, "near", 0.7)
    # the exact reference: greedy keep-first over all pairs
    sh = [quality._shingles(quality.chat_text(e)) for e in data]
    ref = []
    for i in range(len(data)):
        if all(quality.jaccard(sh[i], sh[j]) < 0.7 for j in ref):
            ref.append(i)
    assert [k.prompt for k in kept] == [data[i].prompt for i in ref]


def test_category_balance():
    data = [ex(f"a{i}", "a") for i in range(5)] + [ex(f"b{i}", "b") for i in range(2)] + [ex("n")]
    kept, why = quality.balance(data, 3, False)
    assert quality.per_category(kept) == {"(none)": 1, "a": 3, "b": 2} and why == {"category_cap": 2}
    kept, _ = quality.balance(data, None, True)
    assert quality.per_category(kept) == {"(none)": 1, "a": 2, "b": 2}
    assert quality.balance(data, None, False)[0] == data


def test_answer_checks():
    checks = ["empty", "truncated", "reference_mismatch"]
    assert quality.answer_problem({"text": "  ", "finish_reason": "stop"}, ex("q"), checks, 0.1) == "empty"
    assert quality.answer_problem({"text": "x", "finish_reason": "length"}, ex("q"), checks, 0.1) == "truncated"
    assert quality.answer_problem({"text": "blue sky", "finish_reason": "stop"}, ex("q", reference="red apple"),
                                  checks, 0.1) == "reference_mismatch"
    assert quality.answer_problem({"text": "the sky is blue", "finish_reason": "stop"},
                                  ex("q", reference="blue"), checks, 0.1) is None
    assert quality.answer_problem({"text": "", "finish_reason": "length"}, ex("q"), [], 0.1) is None


def test_pipeline_removes_duplicates_before_the_teacher_and_bad_answers_before_training(load, prompts_files):
    train_file, eval_file = prompts_files
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    rows += [{"prompt": rows[0]["prompt"].upper()}, {"prompt": rows[1]["prompt"].replace("?", " please?")}]  # an exact and a near copy
    write_jsonl(train_file, [{**r, "category": "even" if i % 2 == 0 else "odd"} for i, r in enumerate(rows)])
    base = ("data.dedupe=near", "data.near_duplicate_threshold=0.75", "train.steps=2", "train.baseline=false")
    recipe = load(*base, "data.reject=[truncated]")
    train_ex, eval_ex, stats = load_data_with_stats(recipe)
    assert stats["train"]["rows_in"] == 26 and stats["train"]["kept"] == len(train_ex) == 24
    assert stats["train"]["rejected"] == {"exact_duplicate": 1, "near_duplicate": 1}
    summary = pipeline.generate(recipe)
    assert summary["rows"] == 32  # the teacher never saw the copies
    pipeline.train(recipe)
    written = json.loads((recipe.out_dir / "data_quality.json").read_text())
    cached = TeacherCache(recipe.cache_dir).read(set(TeacherPrompts(recipe).keys(train_ex)))
    truncated = sum(r["finish_reason"] == "length" for r in cached.values())
    assert 0 < truncated < 24
    assert written["train"]["rejected"]["truncated"] == truncated
    assert written["train"]["kept"] == 24 - truncated
    assert sum(written["train"]["per_category_after"].values()) == 24 - truncated
    html = recipe.out_dir / "report.html"
    write_html_report({"data": written}, html)
    text = html.read_text()
    assert "<h2>Data</h2>" in text and "truncated: " in text and "near_duplicate: 1" in text

    with pytest.raises(DistilError) as e:  # nothing left to train on is a clear error
        checked_answers(load(*base, "data.reject=[empty]"), train_ex[:2],
                                  [{"text": "", "finish_reason": "stop"}] * 2, ["k1", "k2"])
    assert e.value.field == "data.reject"
