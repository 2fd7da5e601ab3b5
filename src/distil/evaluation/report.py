"""Render the evaluation report card (report.json) as one self-contained HTML page.

The page has no external CSS, JS or fonts and needs no network: plots are drawn with
matplotlib's Agg canvas and embedded as base64 PNG ``<img>`` tags. Figures are built with
``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` directly, so rendering never touches
pyplot's global state or the process-wide backend (safe in notebooks, threads and servers).

Example:
    >>> import json
    >>> report = json.load(open("runs/quickstart/report.json"))      # doctest: +SKIP
    >>> write_html_report(report, "runs/quickstart/report.html")      # doctest: +SKIP
    PosixPath('runs/quickstart/report.html')
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distil.evaluation import gates
from distil.files import write_json, write_text

__all__ = ["SCHEMA_PATH", "read_train_logs", "write_html_report", "write_report"]

# The JSON Schema every report.json follows, whatever the task (shipped inside the package).
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")

_ROLES = ("teacher", "student", "baseline")
_ROLE_COLORS = {"teacher": "#4c72b0", "student": "#dd8452", "baseline": "#8c8c8c"}
_EXTRA_RUN_COLORS = ("#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#64b5cd")
_DASH = "\u2014"  # "—", shown for missing values


# --------------------------------------------------------------------------- formatting

def _num(value: Any) -> float | None:
    """`value` as a finite float, or None (missing, null, bool, text, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _e(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def _fmt_value(value: Any) -> str:
    """A metric value: 4 significant digits, thousands separators for large numbers."""
    v = _num(value)
    if v is None:
        return _DASH if value is None or isinstance(value, (int, float)) else str(value)
    if v == 0:
        return "0"
    if abs(v) >= 10_000:
        return f"{v:,.0f}"
    if abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4g}"


def _fmt_pct(value: Any) -> str:
    v = _num(value)
    return _DASH if v is None else f"{v * 100:.0f}%"


def _fmt_params(value: Any) -> str:
    v = _num(value)
    if v is None:
        return _DASH
    if abs(v) >= 1e9:
        return f"{v / 1e9:.2f}B"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.1f}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:.1f}K"
    return f"{v:.0f}"


def _fmt_mb(value: Any) -> str:
    v = _num(value)
    return _DASH if v is None else f"{v / 1e6:,.1f}"


def _fmt_fixed(value: Any, digits: int) -> str:
    v = _num(value)
    return _DASH if v is None else f"{v:,.{digits}f}"


def _fmt_seconds(value: Any) -> str:
    v = _num(value)
    if v is None:
        return _DASH
    if v < 60:
        return f"{v:.1f} s"
    minutes, seconds = divmod(round(v), 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _mpl_text(text: Any) -> str:
    """Text for a matplotlib label: escape '$' so names never turn into mathtext."""
    return str(text).replace("$", r"\$")


# --------------------------------------------------------------------------- plotting

def _png_img(fig: Figure, alt: str) -> str:
    """Render `fig` to PNG and return an <img> tag with it embedded as base64."""
    try:
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    finally:
        fig.clear()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _series(records: Iterable[Any], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the records, skipping records without a finite value."""
    xs: list[float] = []
    ys: list[float] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            continue
        y = _num(rec.get(key))
        if y is None:
            continue
        x = _num(rec.get("step"))
        xs.append(float(i) if x is None else x)
        ys.append(y)
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return [xs[i] for i in order], [ys[i] for i in order]


def _run_color(name: str, index: int) -> str:
    return _ROLE_COLORS.get(name, _EXTRA_RUN_COLORS[index % len(_EXTRA_RUN_COLORS)])


def _loss_plot(train_logs: Mapping[str, Any] | None) -> str | None:
    """Loss vs step, one line per run; a second panel with ce (solid) / kd (dashed) if logged."""
    if not isinstance(train_logs, Mapping):
        return None
    runs = [(str(name), recs) for name, recs in train_logs.items() if isinstance(recs, (list, tuple))]
    loss = {name: _series(recs, "loss") for name, recs in runs}
    parts = {name: {k: _series(recs, k) for k in ("ce", "kd")} for name, recs in runs}
    has_loss = any(xs for xs, _ in loss.values())
    has_parts = any(xs for p in parts.values() for xs, _ in p.values())
    if not (has_loss or has_parts):
        return None

    panels = int(has_loss) + int(has_parts)
    fig = Figure(figsize=(5.2 * panels, 3.4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax_iter = iter(axes)
    if has_loss:
        ax = next(ax_iter)
        for i, (name, (xs, ys)) in enumerate(loss.items()):
            if xs:
                ax.plot(xs, ys, color=_run_color(name, i), lw=1.6, label=_mpl_text(name))
        ax.set_title("training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=9)
    if has_parts:
        ax = next(ax_iter)
        for i, (name, comp) in enumerate(parts.items()):
            for key, style in (("ce", "-"), ("kd", "--")):
                xs, ys = comp[key]
                if xs:
                    ax.plot(xs, ys, style, color=_run_color(name, i), lw=1.4,
                            label=_mpl_text(f"{name} {key}"))
        ax.set_title("loss components (ce solid, kd dashed)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=9)
    return _png_img(fig, "training loss curves")


def _metric_plot(name: str, metric: Mapping[str, Any], roles: list[str]) -> str | None:
    """Teacher / student / baseline bars for one metric; None if it has no numeric value."""
    labels, values, colors = [], [], []
    for role in roles:
        v = _num(metric.get(role))
        if v is not None:
            labels.append(role)
            values.append(v)
            colors.append(_ROLE_COLORS[role])
    if not values:
        return None
    hib = metric.get("higher_is_better")
    arrow = " (\u2191 higher is better)" if hib is True else " (\u2193 lower is better)" if hib is False else ""
    fig = Figure(figsize=(3.6, 2.8), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(labels, values, color=colors, width=0.6)
    ax.bar_label(bars, labels=[_fmt_value(v) for v in values], padding=2, fontsize=9)
    ax.set_title(_mpl_text(name) + arrow, fontsize=10)
    ax.axhline(0, color="black", lw=0.8)
    ax.margins(y=0.18)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _png_img(fig, f"{name}: " + " vs ".join(labels))


def _category_retention(per_category: Mapping[str, Any]) -> tuple[list[str], list[Any], list[str]]:
    """(categories, their dicts, metric names) from the per_category block."""
    cats: list[str] = []
    entries: list[Any] = []
    metric_names: list[str] = []
    for cat, entry in per_category.items():
        if not isinstance(entry, Mapping):
            continue
        cats.append(str(cat))
        entries.append(entry)
        ret = entry.get("retention")
        if isinstance(ret, Mapping):
            for m, v in ret.items():
                if _num(v) is not None and m not in metric_names:
                    metric_names.append(str(m))
    return cats, entries, metric_names


def _category_plot(per_category: Mapping[str, Any]) -> str | None:
    """Horizontal grouped bars: retention (%) per category, one bar per metric."""
    cats, entries, metric_names = _category_retention(per_category)
    if not cats or not metric_names:
        return None
    n_m = len(metric_names)
    height = 0.8 / n_m
    fig = Figure(figsize=(7.0, max(2.4, 0.35 * len(cats) * max(1, n_m * 0.7) + 1.2)),
                 layout="constrained")
    ax = fig.subplots()
    for j, metric in enumerate(metric_names):
        ys, ws = [], []
        for i, entry in enumerate(entries):
            ret = entry.get("retention")
            v = _num(ret.get(metric)) if isinstance(ret, Mapping) else None
            if v is not None:
                ys.append(i - 0.4 + height * (j + 0.5))
                ws.append(v * 100)
        bars = ax.barh(ys, ws, height=height * 0.9, label=_mpl_text(metric),
                       color=_EXTRA_RUN_COLORS[j % len(_EXTRA_RUN_COLORS)])
        ax.bar_label(bars, labels=[f"{w:.0f}%" for w in ws], padding=2, fontsize=8)
    ticks = []
    for cat, entry in zip(cats, entries):
        n = _num(entry.get("n"))
        ticks.append(_mpl_text(cat if n is None else f"{cat} (n={n:.0f})"))
    ax.set_yticks(range(len(cats)), ticks)
    ax.invert_yaxis()
    ax.axvline(100, color="black", lw=0.8, ls=":")
    ax.set_xlabel("retention of teacher quality (%)")
    ax.margins(x=0.12)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    if n_m > 1:
        ax.legend(frameon=False, fontsize=9, loc="lower right")
    else:
        ax.set_title(_mpl_text(f"retention by category ({metric_names[0]})"), fontsize=10)
    return _png_img(fig, "retention by category")


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; font-size: 0.9em; }
.headline { font-size: 1.2em; background: #f4f7fb; border-left: 4px solid #4c72b0;
            padding: 0.7em 1em; margin: 1.2em 0; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 1em; min-width: 9em; }
.card b { font-size: 1.4em; display: block; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.95em; }
th, td { padding: 0.35em 0.8em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #fafafa; } td:first-child, th:first-child, th.text { text-align: left; }
td.text { text-align: left; color: #555; }
.plots { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-start; }
.plots img, .wide img { max-width: 100%; border: 1px solid #eee; }
footer { margin-top: 3em; color: #999; font-size: 0.8em; }
"""


def _table(header: list[str] | None, rows: list[list[str]], text_cols: Iterable[int] = ()) -> str:
    """An HTML table (no header row if `header` is None); `rows` cells are escaped HTML."""
    text_cols = set(text_cols)
    head = "".join(f'<th class="text">{_e(h)}</th>' if j in text_cols else f"<th>{_e(h)}</th>"
                   for j, h in enumerate(header or []))
    head = f"<thead><tr>{head}</tr></thead>" if header else ""
    body = "".join(
        "<tr>" + "".join(
            f'<td class="text">{c}</td>' if j in text_cols else f"<td>{c}</td>"
            for j, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _models(report: Mapping[str, Any]) -> Mapping[str, Any]:
    models = report.get("models")
    return models if isinstance(models, Mapping) else {}


def _present_roles(report: Mapping[str, Any]) -> list[str]:
    """Roles shown: those with a model entry or any metric value."""
    metrics = report.get("metrics") if isinstance(report.get("metrics"), Mapping) else {}
    roles = []
    for role in _ROLES:
        if isinstance(_models(report).get(role), Mapping) or any(
                isinstance(m, Mapping) and m.get(role) is not None for m in metrics.values()):
            roles.append(role)
    return roles


def _fmt_speed(speed: Any) -> str:
    """'68.6 tokens/s' from {"value", "unit"}."""
    if not isinstance(speed, Mapping) or _num(speed.get("value")) is None:
        return _DASH
    return f"{_fmt_fixed(speed['value'], 1)} {speed.get('unit', '')}".strip()


def _models_section(report: Mapping[str, Any]) -> str:
    rows = []
    for role in _ROLES:
        model = _models(report).get(role)
        if not isinstance(model, Mapping):
            continue
        params = _num(model.get("params"))
        rows.append([
            _e(role),
            _e(model.get("name", _DASH)),
            f'<span title="{_e(f"{params:,.0f}")}">{_e(_fmt_params(params))}</span>'
            if params is not None else _DASH,
            _e(_fmt_mb(model.get("size_bytes"))),
            _e(_fmt_speed(model.get("speed"))),
            _e(_fmt_fixed(model.get("latency_s"), 2)),
            _e(_fmt_mb(model.get("peak_memory_bytes"))),
        ])
    if not rows:
        return ""
    header = ["model", "name", "params", "size on disk (MB)", "speed", "latency (s)", "peak memory (MB)"]
    return "<h2>Models</h2>" + _table(header, rows, text_cols=[1])


def _fmt_gap(gap: Any) -> str:
    """'+0.003 [-0.004, +0.010]': the student's difference to the baseline and its bootstrap interval."""
    if not isinstance(gap, Mapping) or _num(gap.get("value")) is None:
        return _DASH
    low, high = (gap.get("ci95") or [None, None])[:2]
    interval = f" [{low:+.3g}, {high:+.3g}]" if _num(low) is not None and _num(high) is not None else ""
    return f"{gap['value']:+.3g}{interval}"


def _metrics_section(report: Mapping[str, Any], roles: list[str]) -> tuple[str, list[str]]:
    """The metrics table and one bar-chart <img> per metric with a numeric value."""
    metrics = report.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        return "", []
    rows, imgs = [], []
    gaps = any(isinstance(m, Mapping) and isinstance(m.get("student_minus_baseline"), Mapping)
               for m in metrics.values())
    for name, m in metrics.items():
        if not isinstance(m, Mapping):
            continue
        hib = m.get("higher_is_better")
        arrow = ('<span title="higher is better">\u2191</span>' if hib is True else
                 '<span title="lower is better">\u2193</span>' if hib is False else _DASH)
        gap = [_e(_fmt_gap(m.get("student_minus_baseline")))] if gaps else []
        rows.append([_e(name)] + [_e(_fmt_value(m.get(r))) for r in roles] + gap
                    + [arrow, _e(_fmt_pct(m.get("retention"))), _e(m.get("description", ""))])
        img = _metric_plot(str(name), m, roles)
        if img:
            imgs.append(img)
    header = ["metric"] + roles + (["student \u2212 baseline [95% CI]"] if gaps else []) + \
        ["better", "retention", "description"]
    return "<h2>Metrics</h2>" + _table(header, rows, text_cols=[len(header) - 1]), imgs


def _exports_section(report: Mapping[str, Any]) -> str:
    """Exported artifacts: size, speed and each metric's change against the fp32 student."""
    exports = report.get("exports")
    if not isinstance(exports, Mapping) or not isinstance(exports.get("rows"), list):
        return ""
    ref = exports.get("reference") if isinstance(exports.get("reference"), Mapping) else {}
    metric_names = list((ref.get("metrics") or {}).keys())
    rows = []
    for row in [ref] + [r for r in exports["rows"] if isinstance(r, Mapping)]:
        change = row.get("change") if isinstance(row.get("change"), Mapping) else {}
        cells = [_e(row.get("label", _DASH)), _e(row.get("runtime", _DASH)), _e(_fmt_mb(row.get("size_bytes"))),
                 _e(_fmt_speed(row.get("speed")))]
        for m in metric_names:
            value = _fmt_value((row.get("metrics") or {}).get(m))
            delta = _num(change.get(m))
            cells.append(_e(value if delta is None else f"{value} ({delta:+.3g})"))
        rows.append(cells)
    header = ["artifact", "runtime", "size (MB)", "speed"] + [f"{m} (change)" for m in metric_names]
    note = f'<p class="meta">{_e(exports["note"])}</p>' if exports.get("note") else ""
    return "<h2>Exports</h2>" + _table(header, rows, text_cols=[0, 1]) + note


def _confusion_plot(matrix: list[list[int]], classes: list[str], title: str) -> str:
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="Blues")
    n = len(classes)
    ax.set_xticks(range(n), [_mpl_text(c) for c in classes], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), [_mpl_text(c) for c in classes], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 12:
        top = max(max(r) for r in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color="white" if v > top / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png_img(fig, f"confusion matrix: {title}")


def _confusion_section(report: Mapping[str, Any]) -> str:
    """Classification: one confusion matrix per model."""
    confusion, classes = report.get("confusion"), report.get("classes")
    if not isinstance(confusion, Mapping) or not confusion or not isinstance(classes, list):
        return ""
    imgs = [_confusion_plot(m, classes, str(role)) for role, m in confusion.items()]
    return "<h2>Confusion matrices</h2>" + '<div class="plots">' + "".join(imgs) + "</div>"


def _settings_section(report: Mapping[str, Any]) -> str:
    settings = report.get("settings")
    if not isinstance(settings, Mapping) or not settings:
        return ""
    return "<h2>Settings</h2>" + _table(None, [[_e(k), _e(v)] for k, v in settings.items()], [0, 1])


def _gates_section(report: Mapping[str, Any]) -> str:
    """The recipe's and the command line's gates, each passed or failed with the value it saw."""
    results = [g for g in report.get("gates") or [] if isinstance(g, Mapping)]
    if not results:
        return ""
    rows = [[_e(g.get("expr")), "passed" if g.get("passed") else "<b>failed</b>", _e(json.dumps(g.get("actual")))]
            for g in results]
    return "<h2>Gates</h2>" + _table(["gate", "result", "actual"], rows, text_cols=[0, 1, 2])


def _category_table(per_category: Mapping[str, Any]) -> str:
    cats, entries, metric_names = _category_retention(per_category)
    if not cats:
        return ""
    rows = []
    for cat, entry in zip(cats, entries):
        ret = entry.get("retention") if isinstance(entry.get("retention"), Mapping) else {}
        n = _num(entry.get("n"))
        rows.append([_e(cat), _DASH if n is None else _e(f"{n:.0f}")]
                    + [_e(_fmt_pct(ret.get(m))) for m in metric_names])
    return _table(["category", "n"] + [f"retention: {m}" for m in metric_names], rows)


def _run_section(report: Mapping[str, Any]) -> str:
    parts = []
    cache = report.get("cache")
    if isinstance(cache, Mapping) and cache:
        rows = []
        if "rows" in cache:
            rows.append(["rows", _e(_fmt_value(cache.get("rows")))])
        if "bytes" in cache:
            rows.append(["size (MB)", _e(_fmt_mb(cache.get("bytes")))])
        if "path" in cache:
            rows.append(["path", f"<code>{_e(cache.get('path'))}</code>"])
        if cache.get("bytes_per_token") is not None:
            rows.append(["bytes per generated token", _e(_fmt_value(cache["bytes_per_token"]))])
        parts_per_token = cache.get("bytes_per_token_parts")
        if isinstance(parts_per_token, Mapping) and parts_per_token:
            biggest = sorted(parts_per_token.items(), key=lambda kv: -kv[1])
            rows.append(["of which", _e(", ".join(f"{name} {b}" for name, b in biggest if b >= 0.1))])
        for key, val in cache.items():
            if key not in ("rows", "bytes", "path", "bytes_per_token", "bytes_per_token_parts"):
                rows.append([_e(key), _e(val)])
        parts.append("<h3>Teacher cache</h3>" + _table(None, rows, text_cols=[1]))
    usage = report.get("teacher_usage")
    if isinstance(usage, Mapping) and usage:
        rows = [[_e(key), _e(json.dumps(val) if isinstance(val, Mapping) else _fmt_value(val))]
                for key, val in usage.items() if key != "replicas"]
        parts.append("<h3>Teacher endpoint usage</h3>" + _table(None, rows, text_cols=[1]))
        replicas = usage.get("replicas")
        if isinstance(replicas, Mapping) and len(replicas) > 1:
            rows = [[f"<code>{_e(url)}</code>", _e(_fmt_value(r.get("rows"))), _e(_fmt_value(r.get("tokens_per_s"))),
                     _e(json.dumps(r.get("errors") or {})), _e(_fmt_value(r.get("taken_out")))]
                    for url, r in replicas.items() if isinstance(r, Mapping)]
            parts.append("<h3>Teacher replicas</h3>" + _table(["replica", "rows", "tokens/s (last run)", "errors",
                                                               "times taken out"], rows, text_cols=[0, 3]))
    timings = report.get("timings_s")
    if isinstance(timings, Mapping) and timings:
        rows = [[_e(stage), _e(_fmt_seconds(sec))] for stage, sec in timings.items()]
        total = sum(v for v in (_num(s) for s in timings.values()) if v is not None)
        rows.append(["<b>total</b>", f"<b>{_e(_fmt_seconds(total))}</b>"])
        parts.append("<h3>Timings</h3>" + _table(["stage", "time"], rows))
    if not parts:
        return ""
    return "<h2>Run</h2>" + "".join(parts)


def _teachers_section(report: Mapping[str, Any]) -> str:
    """Several teachers: each one's share of the rows and the student's agreement on its held-out rows."""
    section = report.get("teachers")
    if not isinstance(section, Mapping) or not isinstance(section.get("teachers"), list):
        return ""
    ensemble = section.get("mode") == "ensemble"
    rows = []
    for t in section["teachers"]:
        if not isinstance(t, Mapping):
            continue
        share = (_e(t.get("role", _DASH)) + f" (weight {_e(_fmt_fixed(t.get('weight'), 2))})" if ensemble
                 else _e(json.dumps(t.get("when")) if t.get("when") else "every other row"))
        rows.append([_e(t.get("name", _DASH)), _e(f"{t.get('type', '')} {t.get('model', '')} ({t.get('dtype', '')})"),
                     share, _e(_fmt_value(t.get("train_rows"))), _e(_fmt_value(t.get("held_out_rows"))),
                     _e(_fmt_value(t.get("student_top1_agreement")))])
    header = ["teacher", "model", "role" if ensemble else "rows (when)", "train rows", "held-out rows",
              "student top-1 agreement"]
    recorded = section.get("held_out_rows_by_recorded_teacher") or {}
    note = ('<p class="meta">held-out cache rows by the teacher they record: '
            + _e(", ".join(f"{k}: {v}" for k, v in recorded.items())) + "</p>") if recorded else ""
    return (f"<h2>Teachers ({_e(section.get('mode', ''))})</h2>"
            + _table(header, rows, text_cols=[0, 1, 2]) + note)


def _data_section(report: Mapping[str, Any]) -> str:
    """Rows kept and rejected by reason per split, and per-category counts before and after."""
    data = report.get("data")
    if not isinstance(data, Mapping) or not data:
        return ""
    rows, cats = [], []
    for split, s in data.items():
        if not isinstance(s, Mapping):
            continue
        rejected = s.get("rejected") or {}
        reasons = ", ".join(f"{k}: {v}" for k, v in rejected.items()) if rejected else "none"
        rows.append([_e(split), _e(_fmt_value(s.get("rows_in"))), _e(_fmt_value(s.get("kept"))), _e(reasons)])
        before, after = s.get("per_category_before") or {}, s.get("per_category_after") or {}
        for cat in before:
            cats.append([_e(split), _e(cat), _e(_fmt_value(before[cat])), _e(_fmt_value(after.get(cat, 0)))])
    html_parts = ["<h2>Data</h2>", _table(["split", "rows in", "kept", "rejected by reason"], rows, text_cols=[0, 3])]
    if cats and any(c[1] != "(none)" for c in cats):
        html_parts.append("<h3>Per category</h3>" + _table(["split", "category", "before", "after"], cats,
                                                           text_cols=[0, 1]))
    return "".join(html_parts)


def _render(report: Mapping[str, Any], train_logs: Mapping[str, Any] | None) -> str:
    title = "distil report card"
    meta = []
    for key, label in (("recipe", "recipe"), ("created", "created"), ("machine", "machine")):
        if report.get(key) not in (None, ""):
            meta.append(f"{label}: <b>{_e(report[key])}</b>")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}{' — ' + _e(report['recipe']) if report.get('recipe') else ''}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    if meta:
        out.append(f'<div class="meta">{" &middot; ".join(meta)}</div>')
    if report.get("headline"):
        out.append(f'<p class="headline">{_e(report["headline"])}</p>')

    cards = []
    compression, speedup = _num(report.get("compression")), _num(report.get("speedup"))
    if compression is not None:
        cards.append(f"<b>{compression:.2f}\u00d7</b>fewer parameters")
    if speedup is not None:
        cards.append(f"<b>{speedup:.2f}\u00d7</b>the speed")
    # only a retention figure the evaluator computed: a mean taken here could disagree
    # with the headline (which metrics count is the evaluator's choice)
    for key in ("mean_retention", "retention"):
        retention = _num(report.get(key))
        if retention is not None:
            cards.insert(0, f"<b>{retention * 100:.0f}%</b>mean retention")
            break
    if cards:
        out.append('<div class="cards">' + "".join(f'<div class="card">{c}</div>' for c in cards)
                   + "</div>")

    out.append(_models_section(report))
    roles = _present_roles(report)
    metrics_html, metric_imgs = _metrics_section(report, roles)
    out.append(metrics_html)
    if metric_imgs:
        out.append('<div class="plots">' + "".join(metric_imgs) + "</div>")

    out.append(_gates_section(report))
    out.append(_confusion_section(report))
    out.append(_exports_section(report))
    per_category = report.get("per_category")
    if isinstance(per_category, Mapping) and per_category:
        table = _category_table(per_category)
        img = _category_plot(per_category)
        if table or img:
            out.append("<h2>Retention by category</h2>" + table)
            if img:
                out.append(f'<div class="wide">{img}</div>')

    loss_img = _loss_plot(train_logs)
    if loss_img:
        out.append(f'<h2>Training</h2><div class="wide">{loss_img}</div>')

    out.append(_teachers_section(report))
    out.append(_data_section(report))
    out.append(_run_section(report))
    out.append(_settings_section(report))
    out.append("<footer>generated by distil</footer></body></html>")
    return "\n".join(part for part in out if part)


def write_html_report(report: dict, out_path: str | os.PathLike, *,
                      train_logs: dict[str, list[dict]] | None = None) -> Path:
    """Render `report` (the dict `distil eval` writes as report.json) as one HTML file.

    The page shows the headline, a models table (params, size on disk, tokens/s, latency,
    peak memory), a metrics table (teacher / student / baseline, which direction is better,
    retention), one bar chart per metric, a per-category retention chart, training-loss
    curves from `train_logs`, and the teacher cache and stage timings. Every key is optional;
    sections without data are left out. All plots are embedded PNGs, so the file is
    self-contained and opens offline.

    Args:
        report: the report dict (see `distil.evaluation.scoring`).
        out_path: where to write the HTML; parent folders are created. Written atomically.
        train_logs: optional run name ("student", "baseline", ...) -> list of metrics.jsonl
            records ({"step", "loss", "ce", "kd", ...}; any key may be missing).

    Returns:
        The path written.

    Example:
        >>> write_html_report({"headline": "student keeps 83%"}, "/tmp/r.html")  # doctest: +SKIP
        PosixPath('/tmp/r.html')
    """
    if not isinstance(report, Mapping):
        raise TypeError(f"report must be a dict, got {type(report).__name__}")
    path = Path(out_path)
    write_text(path, _render(report, train_logs))
    return path


def read_train_logs(out: Path) -> dict[str, list[dict]]:
    """Run name -> its <out>/logs/<name>.jsonl records (the training loop's metrics log)."""
    logs = {}
    for path in sorted((Path(out) / "logs").glob("*.jsonl")):
        logs[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return logs


def write_report(report: dict, out: Path, gate_exprs: Iterable[str] = ()) -> dict:
    """Check `gate_exprs` against `report` (recorded under "gates"), then write <out>/report.json
    and <out>/report.html, for any task. Returns the report."""
    gate_exprs = list(gate_exprs)
    if gate_exprs:
        report["gates"] = gates.evaluate(report, gate_exprs)
    write_json(Path(out) / "report.json", report)
    write_html_report(report, Path(out) / "report.html", train_logs=read_train_logs(Path(out)))
    return report
