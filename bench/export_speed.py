"""Round-robin batch-1 greedy timing (median of 3 rounds) of teacher, student and its exports.

Usage: python bench/export_speed.py RUN_DIR   (RUN_DIR holds student/ and exports/student-onnx, exports/student-int8
written by `distil run export.formats=[onnx,int8]` on recipes/quickstart.yaml; $DISTIL_HOME as for that run)
Round-robin, so a change in machine load hits every model alike.
"""
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from distil.config.loading import load_recipe
from distil.data.splits import load_data
from distil.deploy.runtimes import open_runtime
from distil.deploy.scoring import tokens_per_s
from distil.generation.view import TeacherPrompts, cached_rows

run = Path(sys.argv[1]).resolve()
r = load_recipe(str(Path(__file__).resolve().parent.parent / 'recipes/quickstart.yaml'), [f'out={run}'])
_, ev = load_data(r)
view = TeacherPrompts(r)
rows = cached_rows(r, view.keys(ev), "held-out")
prompts = [x["prompt_ids"] for x in rows[:4]]
ex = f"{run}/exports"
models = {"teacher (fp32)": str(view.source.directory), "student (fp32)": f"{run}/student",
          "student onnx": f"{ex}/student-onnx", "student int8": f"{ex}/student-int8"}
rts = {k: open_runtime(v) for k, v in models.items()}
res = {k: [] for k in models}
for rnd in range(3):
    for k, rt in rts.items():
        res[k].append(tokens_per_s(rt, prompts, pad_id=view.tokenizer.pad_token_id))
    print(rnd, {k: round(v[-1], 1) for k, v in res.items()}, os.getloadavg(), flush=True)
print(json.dumps({k: {"median": statistics.median(v), "all": v} for k, v in res.items()}, indent=1))
print("threads", torch.get_num_threads())
