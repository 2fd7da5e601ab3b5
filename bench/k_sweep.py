"""How many of the teacher's log-probs to keep: bytes per token of the cache against student quality.

    python bench/k_sweep.py --ks 1,4,8,16,32,64 --out runs/k-sweep

The quickstart's teacher writes its rows once at top-64 in the exact (float32) cache format.
Each k's cache is derived from those rows: the first k ranks, the tail re-summed from the
dropped ranks and the old tail, written in the compact format in shards of the quickstart's
size. That is the cache `distil generate` writes at top-k (greedy text does not depend on k, and
the top-k of a distribution are the first k of its top-64). The quickstart's KD student is then
trained on each k's cache (same rows, steps and seed) and every student is scored against the
same reference: the exact top-64 rows of the held-out split. A CE-only student (train.alpha=1)
gives the line the soft targets must beat.

The same run answers whether the compact format costs the student anything: at the
quickstart's k (32) a student is also trained on the exact float32 rows, and both are scored on
the exact top-32 held-out rows (what the uncompressed run's report uses), with 95% bootstrap
intervals of the float32 student's metrics and a paired interval of compact - float32.

Writes results.json and k_sweep.png into --out (`--plot-only` redraws the plot); prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from distil import pipeline
from distil.config.loading import load_recipe
from distil.data.splits import load_data
from distil.evaluation.metrics import paired_bootstrap, score_on_teacher_text, summarize
from distil.generation.cache import TeacherCache
from distil.generation.view import TeacherPrompts, cached_rows
from distil.models import sources
from distil.paths import shipped

RECIPE = shipped("recipes/quickstart.yaml")
SOURCE_K = 64
QUICKSTART_K = 32


def truncated(row: dict, k: int, key: str) -> dict:
    """A cache row's first k ranks, the tail summed from the dropped ranks and the old tail."""
    lps = np.asarray(row["topk_logprobs"], dtype=np.float64)
    tail = np.asarray(row["tail_logprob"], dtype=np.float64)
    tail = np.logaddexp(np.logaddexp.reduce(lps[:, k:], axis=1), tail) if k < lps.shape[1] else tail
    return {**row, "key": key, "topk_ids": [ids[:k] for ids in row["topk_ids"]],
            "topk_logprobs": lps[:, :k].tolist(), "tail_logprob": tail.tolist()}


def derive_cache(source: dict[str, dict], keys: list[str], new_keys: list[str], k: int, root: Path, compact: bool,
                 shard_rows: int) -> dict:
    cache = TeacherCache(root, compact=compact)
    if not cache.shards():
        root.mkdir(parents=True, exist_ok=True)
        rows = [truncated(source[old], k, new) for old, new in zip(keys, new_keys)]
        for start in range(0, len(rows), shard_rows):
            cache.write_shard(rows[start:start + shard_rows])
    return cache.stats()


def train_and_score(recipe, references: dict[str, list[dict]]) -> dict:
    start = time.time()
    pipeline.train(recipe, resume=True)
    train_s = time.time() - start
    view = TeacherPrompts(recipe)
    student = sources.load_causal_lm(recipe.out_dir / "student", device="cpu")
    scored = {name: score_on_teacher_text(student, rows, pad_id=view.tokenizer.pad_token_id)
              for name, rows in references.items()}
    return {"train_s": round(train_s), "rows": scored}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="1,4,8,16,32,64")
    parser.add_argument("--out", type=Path, default=Path("runs/k-sweep"))
    parser.add_argument("--plot-only", action="store_true", help="redraw k_sweep.png from --out's results.json")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    out = args.out.resolve()
    if args.plot_only:
        results = json.loads((out / "results.json").read_text())
        plot(results["runs"], f"exact top-{SOURCE_K}", out / "k_sweep.png")
        return

    def recipe(name: str, k: int, *extra: str):
        return load_recipe(RECIPE, [f"cache={out / 'caches' / name}", f"out={out / 'runs' / name}", f"generate.top_k={k}",
                                    "train.baseline=false", *extra])

    source_recipe = recipe(f"k{SOURCE_K}-float32", SOURCE_K, "generate.cache_format=float32")
    start = time.time()
    pipeline.generate(source_recipe)
    generate_s = time.time() - start
    train_ex, held_out = load_data(source_recipe)
    examples = train_ex + held_out
    source_view = TeacherPrompts(source_recipe)
    source_keys = source_view.keys(examples)
    source_rows = TeacherCache(source_recipe.cache_dir).read(set(source_keys))
    shard_rows = source_recipe.generate.shard_rows

    def derived(name: str, k: int, compact: bool, *extra: str):
        r = recipe(name, k, *extra)
        stats = derive_cache(source_rows, source_keys, TeacherPrompts(r).keys(examples), k, r.cache_dir, compact, shard_rows)
        return r, stats

    exact32, exact32_stats = derived(f"k{QUICKSTART_K}-float32", QUICKSTART_K, False, "generate.cache_format=float32")
    references = {f"exact top-{SOURCE_K}": cached_rows(source_recipe, source_view.keys(held_out), "held-out"),
                  f"exact top-{QUICKSTART_K}": cached_rows(exact32, TeacherPrompts(exact32).keys(held_out), "held-out")}

    runs = {}
    for k in ks:
        r, stats = derived(f"k{k}", k, True)
        runs[f"k{k}"] = {"k": k, "format": "compact", "cache": stats, **train_and_score(r, references)}
    runs[f"k{QUICKSTART_K}-float32"] = {"k": QUICKSTART_K, "format": "float32", "cache": exact32_stats,
                                        **train_and_score(exact32, references)}
    ce, ce_stats = derived("ce-only", min(ks), True, "train.alpha=1.0")
    runs["ce-only"] = {"k": None, "format": "compact", "cache": ce_stats, **train_and_score(ce, references)}

    sweep_ref, qs_ref = f"exact top-{SOURCE_K}", f"exact top-{QUICKSTART_K}"
    for run in runs.values():
        run["scores"] = {name: summarize(rows) for name, rows in run["rows"].items()}
    exact_rows, compact_rows = runs[f"k{QUICKSTART_K}-float32"]["rows"][qs_ref], runs[f"k{QUICKSTART_K}"]["rows"][qs_ref]
    compression = {"float32_intervals": paired_bootstrap(exact_rows, None),
                   "compact_minus_float32": paired_bootstrap(compact_rows, exact_rows),
                   "float32": runs[f"k{QUICKSTART_K}-float32"]["scores"][qs_ref],
                   "compact": runs[f"k{QUICKSTART_K}"]["scores"][qs_ref]}
    compression["compact_within_float32_intervals"] = {
        m: lo <= compression["compact"][m] <= hi for m, (lo, hi) in compression["float32_intervals"].items()}
    results = {"generate_s": round(generate_s), "runs": {n: {k: v for k, v in r.items() if k != "rows"} for n, r in runs.items()},
               "compression": compression}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(runs, sweep_ref, out / "k_sweep.png")

    print(f"\nteacher rows at top-{SOURCE_K}: {generate_s:.0f} s; scored against the {sweep_ref} held-out rows\n")
    print("| cache | bytes/token | top-1 agreement | KL | perplexity | training s |\n|---|---|---|---|---|---|")
    for name, run in runs.items():
        s = run["scores"][sweep_ref]
        print(f"| {name} ({run['format']}) | {run['cache']['bytes_per_token']} | {s['top1_agreement']:.4f} "
              f"| {s['teacher_kl']:.3f} | {s['perplexity']:.1f} | {run['train_s']} |")
    print(f"\ncompact vs float32 at top-{QUICKSTART_K}, scored against the {qs_ref} held-out rows:")
    print(json.dumps(compression, indent=2))


def plot(runs: dict, reference: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sweep = [r for r in runs.values() if r["k"] is not None and r["format"] == "compact"]
    fig = Figure(figsize=(11, 3.4))
    metrics = (("top1_agreement", "top-1 agreement ↑"), ("teacher_kl", "KL(teacher ‖ student) ↓"),
               ("perplexity", "perplexity of teacher text ↓"))
    for i, (metric, label) in enumerate(metrics):
        ax = fig.add_subplot(1, 3, i + 1)
        x = [r["cache"]["bytes_per_token"] for r in sweep]
        y = [r["scores"][reference][metric] for r in sweep]
        ax.plot(x, y, "o-", label="KD, compact cache")
        for r, xi, yi in zip(sweep, x, y):
            ax.annotate(f"k={r['k']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(runs["ce-only"]["scores"][reference][metric], color="grey", ls="--", label="CE only")
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:.0f}" for v in x])
        ax.minorticks_off()
        ax.set_xlabel("cache bytes per generated token")
        ax.set_title(label, fontsize=10)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


if __name__ == "__main__":
    main()
