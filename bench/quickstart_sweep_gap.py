"""Student minus baseline of two `bench/quickstart_loss_sweep.py` runs, with 95% paired-bootstrap intervals.

Scores both saved students on the quickstart's held-out teacher text (top-1 agreement, KL, perplexity)
and prints each one's metrics and the intervals of A - B over the held-out rows:

    python bench/quickstart_sweep_gap.py B B-ce
"""

import json
import sys
from pathlib import Path

import torch

from distil.config.loading import load_recipe
from distil.data.splits import load_data
from distil.evaluation.metrics import paired_bootstrap, score_on_teacher_text, summarize
from distil.generation.view import TeacherPrompts, cached_rows
from distil.models import sources

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def main(a: str, b: str) -> dict:
    recipe = load_recipe(RECIPE)
    _, held_out = load_data(recipe)
    view = TeacherPrompts(recipe)
    rows = cached_rows(recipe, view.keys(held_out), "held-out")
    scores = {}
    for name in (a, b):
        student = sources.load_causal_lm(Path("runs/loss-sweep") / name / "student", device="cpu")
        with torch.no_grad():
            scores[name] = score_on_teacher_text(student, rows, pad_id=view.tokenizer.pad_token_id)
    return {**{name: summarize(s) for name, s in scores.items()}, f"{a} - {b}": paired_bootstrap(scores[a], scores[b])}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
