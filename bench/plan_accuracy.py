"""`distil plan` against the run it plans: plan a recipe, run it, print plan vs measured per quantity.

    python bench/plan_accuracy.py recipes/quickstart.yaml [key=value ...] [--work runs/plan-accuracy]

Each stage runs in its own process (`distil plan`, `distil generate`, `distil train`) with a fresh
cache and out folder under --work, so nothing is skipped as already done. Measured: rows and bytes
of the cache (`TeacherCache.stats()`), completion tokens, seconds of generate and train (timed in
the process after importing torch and transformers, which no plan counts), and the train process's
peak RSS (VmHWM) against the plan's `train_peak_rss`. Writes <work>/plan_accuracy.json and prints
a Markdown table with the ratio measured / plan.

Heavy: it runs the whole recipe once (the quickstart: minutes of generation on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# Runs `distil ARGS` in this child process, timed after the heavy imports (torch, transformers: a few
# seconds no plan counts), and writes its seconds, peak RSS (bytes) and system CPU seconds to the file named first.
CHILD = """
import json, resource, sys, time
import transformers, distil.pipeline, distil.plan
from distil import cli
from distil.training.memory import resident_bytes
out, sys.argv = sys.argv[1], ["distil", *sys.argv[2:]]
t0 = time.time()
try:
    cli.main()
finally:
    json.dump({"seconds": time.time() - t0, "rss": resident_bytes(peak=True),
               "sys_s": resource.getrusage(resource.RUSAGE_SELF).ru_stime}, open(out, "w"))
"""


def stage(work: Path, name: str, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """`distil ARGS` in a fresh process: (the process, {seconds after imports, rss: peak RSS in bytes, sys_s})."""
    measured = work / f"{name}.json"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(measured), *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        sys.exit(f"distil {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc, json.loads(measured.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, for plan and the run alike")
    parser.add_argument("--work", default="runs/plan-accuracy")
    parser.add_argument("--cache", help="a cache the recipe already filled: train from it, and leave generation "
                                        "out of the comparison (e.g. to compare memory switches)")
    a = parser.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(a.cache).resolve() if a.cache else work / "cache"
    overrides = [*a.overrides, f"out={work / 'out'}", f"cache={cache}"]

    proc, plan_run = stage(work, "plan", "plan", a.recipe, *overrides)
    plan_wall = plan_run["seconds"]
    planned = json.loads(proc.stdout)
    generate_s = None if a.cache else stage(work, "generate", "generate", a.recipe, *overrides)[1]["seconds"]
    train_run = stage(work, "train", "train", a.recipe, *overrides)[1]
    train_s, train_rss = train_run["seconds"], train_run["rss"]

    from distil.generation.cache import TeacherCache

    stats = TeacherCache(str(cache)).stats()
    rows = [("rows", planned["rows"], stats["rows"]),
            ("completion tokens", planned["teacher_tokens"]["completion"], stats["tokens"]),
            ("cache bytes", planned["cache_bytes"], stats["bytes"]),
            ("generate seconds", planned["generate_seconds"], None if generate_s is None else round(generate_s, 1)),
            ("train seconds", planned["train_seconds"], round(train_s, 1)),
            ("peak RSS of train", planned["train_peak_rss"]["total"], train_rss)]
    rows = [r for r in rows if r[2] is not None]
    result = {"recipe": a.recipe, "overrides": a.overrides, "plan_seconds": round(plan_wall, 1), "plan": planned,
              "measured": {"cache": stats, "generate_seconds": generate_s, "train_seconds": train_s,
                           "train_peak_rss_bytes": train_rss},
              "table": [{"quantity": q, "plan": p, "measured": m, "ratio": round(m / p, 3) if p else None}
                        for q, p, m in rows]}
    (work / "plan_accuracy.json").write_text(json.dumps(result, indent=2))
    print(f"plan took {plan_wall:.1f} s\n")
    print("| quantity | plan | measured | measured / plan |\n|---|---:|---:|---:|")
    for r in result["table"]:
        print(f"| {r['quantity']} | {r['plan']} | {r['measured']} | {r['ratio']} |")


if __name__ == "__main__":
    main()
