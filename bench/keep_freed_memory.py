"""CPU training steps with glibc's default malloc against distil's kept freed memory (`keep_freed_memory`).

    python bench/keep_freed_memory.py recipes/quickstart.yaml cache=runs/quickstart/cache [--steps 20] [--repeats 2]

Trains the recipe's student `--steps` steps on its filled cache (no baseline), in a fresh process per
run, alternating DISTIL_KEEP_FREED_MEMORY=0 (glibc's default thresholds) and the default (1 GB
thresholds), and prints per run the median seconds per step after the first (from the JSONL log),
the process's system CPU seconds (page faults show there) and its peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from plan_accuracy import stage  # the same fresh-process runner: seconds, peak RSS, system CPU seconds


def run(recipe: str, overrides: list[str], steps: int, keep: bool, work: Path) -> dict:
    out = work / ("kept" if keep else "default")
    env = {**os.environ, "DISTIL_KEEP_FREED_MEMORY": "1" if keep else "0"}
    args = ["train", recipe, *overrides, f"out={out}", f"train.steps={steps}", "train.baseline=false",
            "train.log_every=1", f"train.checkpoint_every={steps + 1}"]
    m = stage(work, "train", *args, env=env)[1]
    log = [json.loads(x) for x in (out / "logs" / "student.jsonl").read_text().splitlines() if x.strip()]
    step = statistics.median(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(log, log[1:]))
    return {"malloc": "kept (1 GB thresholds)" if keep else "glibc default", "s_per_step": round(step, 3),
            "sys_s": round(m["sys_s"], 1), "peak_rss_mb": round(m["rss"] / 2 ** 20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (cache=... a filled cache)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    a = parser.parse_args()
    print("| malloc | s / step (median) | system CPU s | peak RSS MB |\n|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            for keep in (False, True):
                r = run(a.recipe, a.overrides, a.steps, keep, Path(tmp))
                print(f"| {r['malloc']} | {r['s_per_step']} | {r['sys_s']} | {r['peak_rss_mb']:,} |", flush=True)
                shutil.rmtree(Path(tmp) / ("kept" if keep else "default"))


if __name__ == "__main__":
    main()
