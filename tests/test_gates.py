"""Gates on the report card (distil.evaluation.gates) and the one report schema."""

from __future__ import annotations

import jsonschema
import pytest
from conftest import assert_valid_report

from distil.errors import DistilError
from distil.evaluation import gates


def _report(ci95=(-0.3, -0.1)):
    speed = {"value": 10.0, "unit": "tokens/s"}
    model = {"name": "m", "path": "p", "params": 100, "size_bytes": 400, "speed": speed, "peak_memory_bytes": None}
    return {"task": "causal_lm", "headline": "h", "compression": 4.0, "speedup": 2.0,
            "models": {"teacher": {**model, "params": 400}, "student": model, "baseline": model},
            "metrics": {
                "top1_agreement": {"teacher": 1.0, "student": 0.4, "baseline": 0.38, "higher_is_better": True,
                                   "description": "d", "retention": 0.4,
                                   "student_minus_baseline": {"value": 0.02, "ci95": [-0.01, 0.05]}},
                "teacher_kl": {"teacher": 0.0, "student": 3.5, "baseline": 3.7, "higher_is_better": False,
                               "description": "d", "retention": None,
                               "student_minus_baseline": {"value": -0.2, "ci95": list(ci95)}}}}


def test_gates_compare_fields_and_top_level_numbers():
    results = gates.evaluate(_report(), ["top1_agreement.retention >= 0.35", "top1_agreement.student > 0.5",
                                         "compression>=4", "speedup < 1.5"])
    assert [r["passed"] for r in results] == [True, False, True, False]
    assert results[1]["actual"] == 0.4 and results[2]["expr"] == "compression >= 4"


def test_a_gap_gate_asks_about_the_whole_interval():
    # value -0.2 but the interval reaches above 0: "< 0" does not hold
    assert gates.evaluate(_report(), ["teacher_kl.student_minus_baseline < 0"])[0]["passed"]
    assert not gates.evaluate(_report((-0.3, 0.01)), ["teacher_kl.student_minus_baseline < 0"])[0]["passed"]
    # agreement's gap is +0.02 with an interval from -0.01: not above 0 as a whole
    result = gates.evaluate(_report(), ["top1_agreement.student_minus_baseline > 0"])[0]
    assert not result["passed"]
    assert gates.describe(result) == "top1_agreement.student_minus_baseline > 0 (actual: 0.02, 95% CI [-0.01, 0.05])"


@pytest.mark.parametrize("expr, message", [
    ("top1_agreement.retention => 0.3", "bad gate"),
    ("top1_agreement.mean >= 0.3", "unknown field 'mean'"),
    ("bleu.student >= 0.3", "no metric 'bleu'"),
    ("top1_agreement >= 0.3", "is a metric; name a field"),
    ("headline > 0", "no metric or top-level number"),
])
def test_a_bad_gate_is_an_error_naming_it(expr, message):
    with pytest.raises(DistilError, match=message) as info:
        gates.evaluate(_report(), [expr])
    assert info.value.field == "eval.gates"


def test_a_gate_on_a_missing_baseline_says_so():
    report = _report()
    del report["models"]["baseline"]
    for m in report["metrics"].values():
        del m["baseline"], m["student_minus_baseline"]
    with pytest.raises(DistilError, match="no baseline"):
        gates.evaluate(report, ["teacher_kl.student_minus_baseline < 0"])


def test_failed_lists_one_line_per_failed_gate():
    report = _report()
    report["gates"] = gates.evaluate(report, ["compression > 10", "compression > 1", "speedup > 3"])
    assert gates.failed(report) == ["compression > 10 (actual: 4)", "speedup > 3 (actual: 2)"]


def test_the_schema_accepts_a_report_card_and_rejects_what_breaks_its_shape():
    report = _report()
    assert_valid_report(report)
    old_classification = {"task": "classification", "headline": "h", "models": {"student": {"accuracy": 0.9}}}
    with pytest.raises(jsonschema.ValidationError):
        assert_valid_report(old_classification)
    report["metrics"]["teacher_kl"]["higher_is_better"] = "no"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'boolean'"):
        assert_valid_report(report)
