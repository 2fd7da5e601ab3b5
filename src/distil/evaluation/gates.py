"""CI gates on a report card: `top1_agreement.retention >= 0.35`, `compression >= 4`.

Grammar: `<metric>.<field> <op> <number>` with field one of teacher | student | baseline |
retention | student_minus_baseline and op one of >=, >, <=, <; or `<name> <op> <number>` for a
top-level number of the report (compression, speedup, eval_rows). A gate on
`student_minus_baseline` with a bootstrap interval asks about the whole 95% interval: `< 0` and
`<= 0` hold when its upper bound is below (or at) 0, `> 0` and `>= 0` when its lower bound is above
(or at) 0; without an interval the difference itself is compared.

Pure functions: `parse` checks one expression, `evaluate` gives one {expr, passed, actual} per
gate, `describe` the line `distil eval` prints for a failed one. A malformed expression, an
unknown metric or a gate on a baseline that was not trained is a `DistilError` naming the gate.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

from distil.errors import DistilError

FIELDS = ("teacher", "student", "baseline", "retention", "student_minus_baseline")
OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
FIELD = "eval.gates"
_GATE = re.compile(r"^\s*(?P<name>[A-Za-z_][\w@\-]*)(?:\.(?P<field>[\w@\-]+))?\s*(?P<op>>=|<=|>|<)\s*"
                   r"(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Gate:
    expr: str
    name: str
    field: str | None
    op: str
    threshold: float


def parse(expr: str) -> Gate:
    """One gate expression, checked; a DistilError naming it if it is not one."""
    match = _GATE.match(expr) if isinstance(expr, str) else None
    if match is None:
        raise DistilError(f"bad gate {expr!r}: expected `<metric>.<field> <op> <number>` (field: {' | '.join(FIELDS)}; "
                          f"op: >=, >, <=, <) or `<name> <op> <number>`, e.g. `top1_agreement.retention >= 0.35`",
                          field=FIELD)
    field = match["field"]
    if field is not None and field not in FIELDS:
        raise DistilError(f"bad gate {expr!r}: unknown field {field!r} (one of {', '.join(FIELDS)})", field=FIELD)
    canonical = f"{match['name']}{'.' + field if field else ''} {match['op']} {match['number']}"
    return Gate(canonical, match["name"], field, match["op"], float(match["number"]))


def parse_all(exprs: list[str]) -> list[Gate]:
    return [parse(e) for e in exprs]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def check(gate: Gate, report: dict) -> dict:
    """{expr, passed, actual} of one gate on a report card."""
    metrics = report.get("metrics") or {}
    if gate.field is None:
        if gate.name in metrics:
            raise DistilError(f"gate {gate.expr!r}: {gate.name} is a metric; name a field, e.g. "
                              f"{gate.name}.student (one of {', '.join(FIELDS)})", field=FIELD)
        if gate.name not in report or isinstance(report[gate.name], (dict, list, str)):
            raise DistilError(f"gate {gate.expr!r}: no metric or top-level number {gate.name!r} in the report "
                              f"(metrics: {', '.join(metrics) or 'none'}; numbers: compression, speedup)", field=FIELD)
        actual = _number(report[gate.name])
        return {"expr": gate.expr, "passed": actual is not None and OPS[gate.op](actual, gate.threshold), "actual": actual}
    if gate.name not in metrics:
        raise DistilError(f"gate {gate.expr!r}: no metric {gate.name!r} in the report (metrics: "
                          f"{', '.join(metrics) or 'none'})", field=FIELD)
    entry = metrics[gate.name]
    if gate.field in ("baseline", "student_minus_baseline") and entry.get("baseline") is None:
        raise DistilError(f"gate {gate.expr!r}: this report has no baseline for {gate.name} "
                          "(train.baseline trains one where the task has it)", field=FIELD)
    if gate.field != "student_minus_baseline":
        actual = _number(entry.get(gate.field))
        return {"expr": gate.expr, "passed": actual is not None and OPS[gate.op](actual, gate.threshold), "actual": actual}
    gap = entry["student_minus_baseline"]
    interval = gap.get("ci95")
    if interval:  # the whole interval must be on the gate's side
        bound = _number(interval[0] if gate.op in (">", ">=") else interval[1])
    else:
        bound = _number(gap.get("value"))
    actual = {"value": gap.get("value"), "ci95": interval}
    return {"expr": gate.expr, "passed": bound is not None and OPS[gate.op](bound, gate.threshold), "actual": actual}


def evaluate(report: dict, exprs: list[str]) -> list[dict]:
    """One {expr, passed, actual} per gate, in order (parsed first, so a bad one fails before any is checked)."""
    return [check(gate, report) for gate in parse_all(exprs)]


def _fmt(value: Any) -> str:
    return "undefined" if value is None else f"{value:.6g}"


def describe(result: dict) -> str:
    """'teacher_kl.student_minus_baseline < 0 (actual: -0.000677, 95% CI [-0.000929, -0.000381])'."""
    actual = result["actual"]
    if isinstance(actual, dict):
        text = _fmt(actual.get("value"))
        if actual.get("ci95"):
            low, high = actual["ci95"]
            text += f", 95% CI [{_fmt(low)}, {_fmt(high)}]"
    else:
        text = _fmt(actual)
    return f"{result['expr']} (actual: {text})"


def failed(report: dict) -> list[str]:
    """The line for each failed gate recorded in a report card (`report["gates"]`)."""
    return [describe(g) for g in report.get("gates") or [] if not g["passed"]]
