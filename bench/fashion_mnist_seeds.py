"""Fashion-MNIST: KD student vs the same student on hard labels alone, over several seeds.

Runs `distil run RECIPE train.seed=S out=OUT/seedS` for each seed (RECIPE: --recipe, default
recipes/fashion_mnist.yaml; the teacher is trained once and cached) and prints teacher accuracy
and student / baseline accuracy as mean ± std (sample std, n-1), with the per-seed values.

Usage: python bench/fashion_mnist_seeds.py [--recipe R] [--seeds 0 1 2] [--out runs/fashion_mnist_seeds] [overrides...]
       python bench/fashion_mnist_seeds.py --summarize --out DIR    (only read DIR/seed*/report.json)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from distil.config.loading import load_recipe
from distil.paths import shipped
from distil.pipeline import run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/fashion_mnist.yaml", help="a shipped recipe's path, or any file")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/fashion_mnist_seeds")
    ap.add_argument("--summarize", action="store_true", help="summarize finished runs; train nothing")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    reports = []
    for seed in args.seeds:
        if args.summarize:
            reports.append(json.loads(Path(args.out, f"seed{seed}", "report.json").read_text()))
            continue
        recipe = load_recipe(shipped(args.recipe),
                             [*args.overrides, f"train.seed={seed}", f"out={args.out}/seed{seed}"])
        reports.append(run(recipe)["report"])
        print(f"seed {seed}: {reports[-1]['headline']}", flush=True)
    table = {}
    for role in ("teacher", "student", "baseline"):
        for metric in ("accuracy", "macro_f1", "ece", "teacher_agreement"):
            values = [r["metrics"][metric].get(role) for r in reports]
            if None not in values:
                table[f"{role}.{metric}"] = {"mean": statistics.mean(values),
                                             "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                             "values": values}
    table["params"] = {role: reports[0]["models"][role]["params"] for role in ("teacher", "student")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.summarize:
        table["settings"] = reports[0]["settings"]
    Path(args.out, "summary.json").write_text(json.dumps(table, indent=2))
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
