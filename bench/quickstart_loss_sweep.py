"""Train the quickstart's KD student with other divergence settings and score it on the held-out rows.

Uses the teacher cache the quickstart filled (run `distil run` first) and trains the KD student
only (the baseline ignores these keys). Prints one JSON line per run: top-1 agreement, KL and
perplexity on the held-out teacher text, training seconds.

    python bench/quickstart_loss_sweep.py NAME [key=value ...]
    python bench/quickstart_loss_sweep.py kl2tvd8 train.alpha=0.5 "train.loss={forward_kl: 0.2, tvd: 0.8}"

Each run writes to runs/loss-sweep/NAME (a re-run with the same NAME resumes / skips).
"""

import json
import sys
import time
from pathlib import Path

from distil import pipeline
from distil.config.loading import load_recipe
from distil.data.splits import load_data
from distil.evaluation.metrics import score_on_teacher_text, summarize
from distil.generation.view import TeacherPrompts, cached_rows
from distil.models import sources

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def main(name: str, overrides: list[str]) -> dict:
    recipe = load_recipe(RECIPE, [f"out=runs/loss-sweep/{name}", "train.baseline=false", *overrides])
    start = time.time()
    pipeline.train(recipe, resume=True)
    train_s = time.time() - start
    _, held_out = load_data(recipe)
    view = TeacherPrompts(recipe)
    rows = cached_rows(recipe, view.keys(held_out), "held-out")
    student = sources.load_causal_lm(recipe.out_dir / "student", device="cpu")
    scores = summarize(score_on_teacher_text(student, rows, pad_id=view.tokenizer.pad_token_id))
    return {"name": name, "overrides": overrides, "train_s": round(train_s), **scores}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])), flush=True)
