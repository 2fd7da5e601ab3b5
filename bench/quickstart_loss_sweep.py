"""Train the quickstart's KD student (or its CE-only baseline) with other settings and score it on the held-out rows.

Fills the teacher cache first where rows are missing (skips what is cached), then trains one
student and prints one JSON line: top-1 agreement, KL and perplexity on the held-out teacher
text, distinct greedy answers, token F1 against the references, training seconds and steps.

    python bench/quickstart_loss_sweep.py NAME [key=value ...]
    python bench/quickstart_loss_sweep.py kl2tvd8 train.alpha=0.5 "train.loss={forward_kl: 0.2, tvd: 0.8}"
    python bench/quickstart_loss_sweep.py ce-only train.alpha=1.0     # the CE-only baseline, same steps and data
    python bench/quickstart_loss_sweep.py more-data data.max_train=null train.steps=400

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
from distil.evaluation.scoring import answer_metrics, generate_answers
from distil.generation.decoding import stop_token_ids
from distil.generation.view import TeacherPrompts, cached_rows
from distil.models import sources

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def main(name: str, overrides: list[str]) -> dict:
    recipe = load_recipe(RECIPE, [f"out=runs/loss-sweep/{name}", "train.baseline=false", *overrides])
    pipeline.generate(recipe)
    start = time.time()
    trained = pipeline.train(recipe, resume=True)
    train_s = time.time() - start
    _, held_out = load_data(recipe)
    view = TeacherPrompts(recipe)
    rows = cached_rows(recipe, view.keys(held_out), "held-out")
    student = sources.load_causal_lm(recipe.out_dir / "student", device="cpu")
    scores = summarize(score_on_teacher_text(student, rows, pad_id=view.tokenizer.pad_token_id))
    answers = generate_answers(student, view.tokenizer, rows, max_new_tokens=recipe.generate.max_new_tokens,
                               batch_size=recipe.eval.batch_size, stop_ids=stop_token_ids(view.tokenizer, student))
    return {"name": name, "overrides": overrides, "train_s": round(train_s), "steps": trained["student"]["steps"],
            **scores, **answer_metrics(answers, [ex.reference for ex in held_out]), "answers": answers[:8]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])), flush=True)
