"""distil beside Hugging Face TRL on the same work: one command, one table (issue 20).

    flock /tmp/BENCH_LOCK python -m bench.peers.run --work runs/peers
    python -m bench.peers.run --work runs/peers --rows trl-sft,distil-ce      # rerun some rows
    python -m bench.peers.run --work runs/peers --variant "distil-supervised/betas=train.adam_betas=[0.9,0.999]"
    python -m bench.peers.run --work runs/peers --table-only                  # table and plot from results.json

Every row starts from the same student (work/student-init), reads the same training prompts and
the teacher's answers from distil's cache, and trains for the same steps, batch size and schedule
(`bench.peers.prepare.Settings`), each in its own process (its peak RSS is its own). Every model
folder is then scored by the one evaluator (`bench.peers.evaluate`). Rows: see `trainers.ROWS`;
a variant is a distil row with extra recipe overrides (one-factor runs), named BASE/LABEL.

Writes work/results.json (rows merge in, so a rerun row replaces its old result) and, with
--plot, a PNG; prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.peers.prepare import Settings, prepare
from bench.peers.trainers import ROWS

REPO = Path(__file__).resolve().parents[2]
# Rows that train on the teacher's written answers, so the teacher's generation is part of their cost.
# (trl-distillation's student writes every completion; the teacher only scores them, inside training.)
READS_TEACHER_TEXT = ("trl-sft", "trl-gkd", "distil")


def train_row(name: str, work: Path, overrides: list[str]) -> dict:
    """Train one row in a fresh process; returns its result.json plus the process's wall time seen from here."""
    out = work / "runs" / name.replace("/", "--")
    shutil.rmtree(out, ignore_errors=True)  # a rerun trains again (distil would reuse a finished student)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.peers.row", name, str(work), str(out), *overrides], check=True,
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads((out / "result.json").read_text())
    result["process_s"] = round(time.perf_counter() - start, 2)
    result["model_dir"] = str(out / "model")
    return result


def parse_variant(text: str) -> tuple[str, list[str]]:
    """"BASE/LABEL=key=value;key=value" -> ("BASE/LABEL", ["key=value", ...])."""
    name, _, overrides = text.partition("=")
    if "/" not in name or name.split("/")[0] not in ROWS or not name.startswith("distil"):
        raise SystemExit(f"--variant {text!r}: expected distil-ROW/LABEL=key=value;key=value")
    return name, [o for o in overrides.split(";") if o]


def with_costs(results: dict, generate_s: float) -> dict:
    """Add teacher-generation seconds (once, and shared among the rows that reuse the cache) and end to end."""
    users = [n for n in results["rows"] if n.startswith(READS_TEACHER_TEXT)]
    for name, r in results["rows"].items():
        uses = name in users
        r["generate_s"] = generate_s if uses else 0.0
        r["generate_amortised_s"] = round(generate_s / len(users), 2) if uses else 0.0
        r["end_to_end_s"] = round(r["process_s"] + r["generate_s"], 2)
        r["s_per_step"] = round(r["loop_s"] / r["steps"], 3)
    return results


def table(results: dict) -> str:
    head = ("| row | top-1 agreement ↑ | KL top-k+tail ↓ | KL full vocab ↓ | perplexity ↓ | distinct answers ↑ "
            "| token F1 ↑ | training process s | s/step | teacher generation s (amortised) | end to end s "
            "| peak RSS MB |\n|" + "---|" * 12)
    lines = [head]
    init = results.get("init")
    if init:
        lines.append(f"| untrained student | {init['top1_agreement']:.4f} | {init['teacher_kl']:.3f} "
                     f"| {init['full_vocab_kl']:.3f} | {init['perplexity']:.1f} | {init['distinct_answers']:.2f} "
                     f"| {init['token_f1']:.3f} | | | | | |")
    for name, r in results["rows"].items():
        q = r["scores"]
        gen = f"{r['generate_s']:.0f} ({r['generate_amortised_s']:.0f})" if r["generate_s"] else "0"
        lines.append(f"| {name} | {q['top1_agreement']:.4f} | {q['teacher_kl']:.3f} | {q['full_vocab_kl']:.3f} "
                     f"| {q['perplexity']:.1f} | {q['distinct_answers']:.2f} | {q['token_f1']:.3f} "
                     f"| {r['process_s']:.0f} | {r['s_per_step']:.2f} | {gen} | {r['end_to_end_s']:.0f} "
                     f"| {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Full-vocabulary KL against end-to-end seconds, one point per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, r in results["rows"].items():
        color = "tab:blue" if name.startswith("distil") else "tab:orange"
        ax.scatter(r["end_to_end_s"], r["scores"]["full_vocab_kl"], color=color)
        ax.annotate(name, (r["end_to_end_s"], r["scores"]["full_vocab_kl"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("end to end seconds (training process + the teacher's generation where the row reads it)")
    ax.set_ylabel("KL(teacher || student), full vocabulary, per token")
    s = results["settings"]
    ax.set_title(f"distil (blue) and TRL (orange): {s['steps']} steps x {s['batch_size']}, "
                 f"{results['train_rows']} prompts, {results['held_out_rows']} held out", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/peers"))
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"),
                        help="teacher, data and generation settings (default: the quickstart's)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--variant", action="append", default=[], help="BASE/LABEL=key=value;key=value")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-train", type=int, default=400)
    parser.add_argument("--max-eval", type=int, default=None)
    parser.add_argument("--layers", default="0,1", help="teacher layers the student starts from")
    parser.add_argument("--plot", type=Path, default=None, help="write the PNG here")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    if not args.table_only:
        settings = Settings(base_recipe=args.recipe, layers=tuple(int(i) for i in args.layers.split(",")),
                            max_train=args.max_train, max_eval=args.max_eval, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, warmup=args.warmup)
        prepared = prepare(settings, work)
        if results.get("settings") != prepared["settings"]:
            results = {"rows": {}}  # other settings: earlier rows are not comparable
        results.update({k: v for k, v in prepared.items()},
                       machine=f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
                       versions=_versions())
        from bench.peers.evaluate import Evaluator

        rows = [(name, []) for name in args.rows.split(",") if name]
        unknown = [n for n, _ in rows if n not in ROWS]
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; rows: {ROWS}")
        rows += [parse_variant(v) for v in args.variant]
        evaluator = Evaluator(work)
        if "init" not in results:
            results["init"] = evaluator.score(work / "student-init")
        for name, overrides in rows:
            result = train_row(name, work, overrides)
            result["scores"] = evaluator.score(Path(result["model_dir"]))
            results["rows"][name] = result
            results_path.write_text(json.dumps(results, indent=2))
    results = with_costs(results, results["generate_s"])
    results_path.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    print(table(results))
    return results


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "accelerate", "trl", "datasets")}


if __name__ == "__main__":
    main()
