"""Tests for the HTML report card (distil.report)."""

from __future__ import annotations

import base64
import copy
import re

import pytest

from distil.evaluation.report import write_html_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _model(name, params, size, tps, lat, mem):
    return {"name": name, "path": f"runs/{name}", "params": params, "size_bytes": size,
            "speed": {"value": tps, "unit": "tokens/s"}, "latency_s": lat, "peak_memory_bytes": mem}


@pytest.fixture
def report():
    return {
        "recipe": "recipes/quickstart.yaml",
        "created": "2026-11-26T07:00:00Z",
        "machine": "2 CPU cores, torch 2.13.0",
        "headline": "student keeps 83% of the teacher's quality (mean retention) "
                    "at 4.1x fewer parameters and 5.2x the speed",
        "task": "causal_lm",
        "models": {"teacher": _model("SmolLM2-135M-Instruct", 134515008, 538090000, 20.1, 1.9, 900000000),
                   "student": _model("student", 32700000, 130800000, 104.5, 0.37, 300000000),
                   "baseline": _model("baseline (cross-entropy only)", 32700000, 130800000, 104.0, 0.38,
                                      300000000)},
        "compression": 4.11,
        "speedup": 5.2,
        "metrics": {
            "token_f1": {"teacher": 0.21, "student": 0.15, "baseline": 0.13,
                         "higher_is_better": True, "retention": 0.71,
                         "description": "token F1 against reference"},
            "top1_agreement": {"teacher": 1.0, "student": 0.55, "baseline": 0.48,
                               "higher_is_better": True, "retention": 0.55},
            "teacher_kl": {"teacher": 0.0, "student": 1.9, "baseline": 2.4,
                           "higher_is_better": False, "retention": None},
            "perplexity": {"teacher": 2.1, "student": 6.3, "baseline": 7.9,
                           "higher_is_better": False, "retention": 0.33},
        },
        "per_category": {"ai": {"n": 12, "retention": {"token_f1": 0.8}},
                         "food": {"n": 5, "retention": {"token_f1": 0.6}}},
        "cache": {"rows": 700, "bytes": 12345678, "path": "runs/quickstart/cache"},
        "timings_s": {"generate": 120.0, "train_student": 200.0, "train_baseline": 190.0,
                      "eval": 80.0},
    }


@pytest.fixture
def train_logs():
    def run(scale):
        return [{"step": s, "loss": scale * (3.0 - s / 50), "ce": scale * (2.6 - s / 60),
                 "kd": 0.4 - s / 500, "lr": 1e-4, "tokens": 80 * s, "elapsed_s": 0.5 * s}
                for s in range(10, 101, 10)]
    baseline = [{"step": r["step"], "loss": r["loss"] + 0.2, "ce": r["ce"] + 0.2}
                for r in run(1.0)]
    return {"student": run(1.0), "baseline": baseline}


def _images(text):
    return IMG_RE.findall(text)


def _expected_images(report, train_logs):
    return ((1 if train_logs else 0) + len(report.get("metrics", {}))
            + (1 if report.get("per_category") else 0))


def test_full_report(tmp_path, report, train_logs):
    out = write_html_report(report, tmp_path / "sub" / "report.html", train_logs=train_logs)
    assert out == tmp_path / "sub" / "report.html"
    assert out.exists()
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # the headline, escaped (it contains an apostrophe)
    assert "student keeps 83% of the teacher&#x27;s quality" in text
    imgs = _images(text)
    assert len(imgs) == _expected_images(report, train_logs) == 6
    assert text.count("<img ") == len(imgs)
    for data in imgs:
        assert base64.b64decode(data, validate=True).startswith(PNG_SIGNATURE)
    # numbers formatted
    assert "71%" in text and "55%" in text and "33%" in text
    assert "80%" in text and "60%" in text  # per-category retention
    assert "134.5M" in text and "32.7M" in text  # params
    assert "538.1" in text  # size on disk in MB
    assert "20.1" in text and "1.90" in text  # tokens/s, latency
    assert "\u2014" in text  # null retention of teacher_kl
    assert "\u2191" in text and "\u2193" in text  # higher/lower-is-better arrows
    assert "token F1 against reference" in text
    assert "cross-entropy only" in text
    assert "2m 00s" in text  # generate timing
    assert "12.3" in text  # cache MB
    # self-contained: no external resources
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<script" not in text
    assert not list(tmp_path.glob("sub/.*.tmp"))  # temp file replaced


def test_missing_optional_parts(tmp_path, report):
    del report["models"]["baseline"]
    for m in report["metrics"].values():
        del m["baseline"]
    del report["per_category"], report["cache"], report["timings_s"]
    out = write_html_report(report, tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")
    imgs = _images(text)
    assert len(imgs) == _expected_images(report, None) == 4
    for data in imgs:
        assert base64.b64decode(data).startswith(PNG_SIGNATURE)
    assert "baseline" not in text
    assert "Timings" not in text and "Teacher cache" not in text


def test_minimal_and_odd_inputs(tmp_path):
    # nothing but a headline; odd train logs (no loss values, junk rows) give no loss plot
    out = write_html_report({"headline": "hello"}, tmp_path / "r.html",
                            train_logs={"student": [{"step": 1, "lr": 1e-4}, "junk"]})
    text = out.read_text(encoding="utf-8")
    assert "hello" in text and not _images(text)

    # a metric with no numeric values, NaN loss, records without "step", empty categories
    report = {"metrics": {"m": {"teacher": None, "student": "n/a", "retention": None}},
              "per_category": {}}
    logs = {"student": [{"loss": 2.0}, {"loss": float("nan")}, {"loss": 1.5, "kd": 0.3}]}
    text = write_html_report(report, tmp_path / "r.html", train_logs=logs).read_text("utf-8")
    assert len(_images(text)) == 1  # the loss plot only
    assert "n/a" in text


def test_html_escaping(tmp_path, report, train_logs):
    report["models"]["teacher"]["name"] = '<script>alert("x")</script> & $x$'
    report["metrics"]["<b>f1</b>"] = report["metrics"].pop("token_f1")
    report["metrics"]["<b>f1</b>"]["description"] = "a < b & c > d"
    report["per_category"] = {"<cat>": {"n": 3, "retention": {"<b>f1</b>": 0.5}}}
    report["headline"] = "keeps <i>most</i> & more"
    logs = copy.deepcopy(train_logs)
    logs["<run>"] = logs.pop("baseline")
    out = write_html_report(report, tmp_path / "r.html", train_logs=logs)
    text = out.read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>f1</b>" not in text and "<cat>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; $x$" in text
    assert "&lt;b&gt;f1&lt;/b&gt;" in text
    assert "a &lt; b &amp; c &gt; d" in text
    assert "keeps &lt;i&gt;most&lt;/i&gt; &amp; more" in text
    assert "&lt;cat&gt;" in text
    assert len(_images(text)) == 6


def test_overwrites_existing_file(tmp_path, report):
    path = tmp_path / "r.html"
    path.write_text("old")
    write_html_report(report, str(path))
    assert "old" != path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def _rows(agree, n=10, kl=1.0, nll=2.0):
    return [{"n": n, "agree": a, "kl": kl, "nll": nll} for a in agree]


def test_paired_bootstrap_against_a_plain_loop():
    """The vectorised bootstrap (paired, and of one model alone) equals a row-by-row loop over the same resampled indices."""
    import math

    import numpy as np

    from distil.evaluation.metrics import paired_bootstrap, summarize

    rng = np.random.default_rng(1)
    a = [{"n": int(n), "agree": float(rng.integers(0, n + 1)), "kl": float(rng.random() * n), "nll": float(rng.random() * 3 * n)}
         for n in rng.integers(1, 40, size=30)]
    b = [{**r, "agree": float(max(0, r["agree"] - rng.integers(0, 3))), "nll": r["nll"] * 1.1} for r in a]
    got = paired_bootstrap(a, b, resamples=300, seed=7)
    idx = np.random.default_rng(7).integers(0, len(a), size=(300, len(a)))
    for metric in ("top1_agreement", "teacher_kl", "perplexity"):
        diffs = [summarize([a[i] for i in row])[metric] - summarize([b[i] for i in row])[metric] for row in idx]
        assert got[metric] == pytest.approx([np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)], rel=1e-9)
    alone = paired_bootstrap(a, None, resamples=300, seed=7)  # the interval of a's own metrics
    for metric in ("top1_agreement", "teacher_kl", "perplexity"):
        values = [summarize([a[i] for i in row])[metric] for row in idx]
        assert alone[metric] == pytest.approx([np.percentile(values, 2.5), np.percentile(values, 97.5)], rel=1e-9)
    assert got["perplexity"][1] < 0  # b's NLL is 10% higher on every row: a's perplexity is lower in every resample
    assert got["teacher_kl"] == [0.0, 0.0]
    assert not math.isnan(got["top1_agreement"][0])


def test_identical_models_have_a_zero_interval_and_a_dominating_one_a_positive_interval():
    from distil.evaluation.metrics import paired_bootstrap

    same = paired_bootstrap(_rows([3, 5, 7, 2]), _rows([3, 5, 7, 2]))
    assert same["top1_agreement"] == [0.0, 0.0]
    better = paired_bootstrap(_rows([4, 6, 8, 3]), _rows([3, 5, 7, 2]))
    assert better["top1_agreement"][0] == pytest.approx(0.1) and better["top1_agreement"][1] == pytest.approx(0.1)


def test_report_shows_student_minus_baseline_with_its_interval(tmp_path, report):
    report = copy.deepcopy(report)
    name = next(iter(report["metrics"]))
    report["metrics"][name]["student_minus_baseline"] = {"value": 0.0031, "ci95": [-0.004, 0.0102]}
    html = write_html_report(report, tmp_path / "r.html").read_text()
    assert "student \u2212 baseline [95% CI]" in html and "+0.0031 [-0.004, +0.0102]" in html


def test_distinct_answers_count_answers_no_other_prompt_repeats():
    from distil.evaluation.scoring import distinct_share

    answers = ["Paris is the capital.", "paris  is the   capital.", "It is 4.", "Blue.", "I am a bot", "I am a bot"]
    assert distinct_share(answers) == pytest.approx(2 / 6)  # case and spacing do not make an answer distinct
    assert distinct_share(["a", "b", "c"]) == 1.0 and distinct_share([]) == 0.0


def test_the_headline_does_not_call_a_student_that_ignores_its_prompts_good():
    from distil.evaluation.metrics import metrics_block
    from distil.evaluation.scoring import LM_METRICS, _headline

    def headline(student_distinct):
        values = {"teacher": {"top1_agreement": 1.0, "distinct_answers": 0.98},
                  "student": {"top1_agreement": 0.7, "distinct_answers": student_distinct}}
        return _headline(metrics_block(values, LM_METRICS), 4.0, 3.0)

    assert "distinct" not in headline(0.95)
    warned = headline(0.3)
    assert "only 30% of its held-out answers are distinct (the teacher's: 98%)" in warned
    assert "does not follow them" in warned
