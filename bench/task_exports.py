"""Export a trained classification / embedding run as hf, onnx and int8 and print each artifact's row.

Copies RUN (a finished `distil run` output folder) to OUT, then runs the export stage of RECIPE on
the copy (`pipeline.export`: write, load back in its runtime, score on the held-out set, add to
OUT/report.json), and prints size and metrics per artifact.

Usage: python bench/task_exports.py RECIPE RUN OUT [overrides...]
  e.g. python bench/task_exports.py recipes/minilm.yaml runs/minilm /tmp/minilm-exports cache=/tmp/ml/cache
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from distil import pipeline
from distil.config.loading import load_recipe


def main() -> None:
    recipe_path, run, out, *overrides = sys.argv[1:]
    if not Path(out).exists():
        shutil.copytree(run, out)
    recipe = load_recipe(recipe_path, [*overrides, f"out={out}", "export.formats=[hf,onnx,int8]"])
    t0 = time.time()
    exports = pipeline.export(recipe)
    print(f"export stage: {time.time() - t0:.0f} s")
    for row in [exports["reference"], *exports["rows"]]:
        print(row["label"], row["runtime"], row.get("size_bytes"), json.dumps(row["metrics"]))
    print(exports["note"])


if __name__ == "__main__":
    main()
