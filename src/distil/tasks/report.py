"""The report card of a classification or embedding run: one self-contained HTML page.

A metrics table (one column per model) and, for classification, a confusion matrix per model,
drawn with the helpers of `distil.evaluation.report` so the page looks like the causal-LM report.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from distil.evaluation.report import _CSS, _e, _png_img, _table
from distil.files import write_text

# metric -> (label, format)
_FORMATS = {"accuracy": "pct", "macro_f1": "pct", "teacher_agreement": "pct", "ece": "f4", "params": "int",
            "examples_per_s": "f1", "sentences_per_s": "f1", "mrr": "f4", "spearman_teacher": "f4",
            "spearman_score": "f4", "knn_accuracy": "pct", "cosine_to_teacher": "f4", "student_agreement": "pct",
            "cosine_to_student": "f4", "max_abs_diff": "f4", "max_abs_logit_diff": "f4"}


def _fmt(key: str, value) -> str:
    if value is None:
        return "—"
    kind = _FORMATS.get(key, "pct" if key.startswith("recall@") else "f4")
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "f1":
        return f"{value:.1f}"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"


def _change(key: str, value: float) -> str:
    """A change against the fp32 student: percentage points for rates, else the metric's own format."""
    sign = "+" if value >= 0 else ""
    if _FORMATS.get(key, "pct" if key.startswith("recall@") else "f4") == "pct":
        return f"{sign}{100 * value:.2f} pts"
    return sign + _fmt(key, value)


def _confusion_plot(matrix: list[list[int]], classes: list[str], title: str) -> str:
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="Blues")
    n = len(classes)
    ax.set_xticks(range(n), [c.replace("$", r"\$") for c in classes], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), [c.replace("$", r"\$") for c in classes], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 12:
        top = max(max(r) for r in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                        color="white" if v > top / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png_img(fig, f"confusion matrix: {title}")


def _exports_section(exports: dict) -> list[str]:
    """One column per artifact (the fp32 student first): size, runtime, each metric and its change."""
    rows = [exports["reference"]] + exports["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    table = [["runtime"] + [_e(r["runtime"]) for r in rows],
             ["size"] + [f"{r['size_bytes'] / 1e6:.2f} MB" if r.get("size_bytes") else "—" for r in rows]]
    for k in keys:
        cells = []
        for r in rows:
            cell = _fmt(k, r["metrics"].get(k))
            change = r.get("change", {}).get(k)
            if change is not None and k not in ("examples_per_s", "sentences_per_s"):
                cell += f" ({_change(k, change)})"
            cells.append(cell)
        table.append([_e(k)] + cells)
    return ["<h2>Exports</h2>", f"<p>{_e(exports.get('note', ''))}</p>",
            _table(["metric"] + [r["label"] for r in rows], table, text_cols=[0])]


def write_task_report(report: dict, path: Path) -> Path:
    """Write report.html for a classification / embedding report dict (see the task modules)."""
    roles = list(report["models"])
    keys = [k for k in dict.fromkeys(k for r in roles for k in report["models"][r]) if k != "path"]
    rows = [[_e(k)] + [_fmt(k, report["models"][r].get(k)) for r in roles] for k in keys]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>distil report card — {_e(report['task'])}</title>", f"<style>{_CSS}</style></head><body>",
           f"<h1>distil report card: {_e(report['task'])}</h1>",
           f'<p class="headline">{_e(report["headline"])}</p>',
           "<h2>Metrics</h2>", _table(["metric"] + roles, rows, text_cols=[0])]
    if report.get("confusion"):
        out.append("<h2>Confusion matrices</h2>")
        out += [_confusion_plot(m, report["classes"], role) for role, m in report["confusion"].items()]
    if report.get("exports"):
        out += _exports_section(report["exports"])
    if report.get("settings"):
        out += ["<h2>Settings</h2>", _table(None, [[_e(k), _e(v)] for k, v in report["settings"].items()], [0])]
    out.append("</body></html>")
    path = Path(path)
    write_text(path, "\n".join(out))
    return path
