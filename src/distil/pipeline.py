"""The four stages as functions: generate, train, evaluate, and run (all three in order).

Each takes a validated `Recipe`. Data files are checked before any model loads, and each
stage skips work that is already done (cached rows, a trained student with the same recipe).
"""

from __future__ import annotations

import json
import time

import torch

from distil import tasks
from distil.config.recipe import Recipe
from distil.data.examples import Example
from distil.data.splits import checked_answers, load_data
from distil.errors import DistilError
from distil.evaluation import gates
from distil.files import check_writable
from distil.generation import expand
from distil.generation.decoding import stop_token_ids
from distil.generation.stage import fill_cache, teacher_view
from distil.generation.view import cached_rows, check_student, is_cross_tokenizer
from distil.models import students
from distil.progress import progress_bar
from distil.training.runs import is_trained, run_fingerprint, save_trained


def generate(recipe: Recipe, shard: tuple[int, int] | None = None) -> dict:
    """Ask the teacher about every train and held-out prompt not yet cached; write cache shards.

    With `shard` (I, N), only the rows whose key falls in shard I of N (`distil generate --shard I/N`).
    Returns a summary: rows total, generated now, already cached, tokens, seconds, tokens/s.
    """
    if recipe.task != "causal_lm":
        if shard is not None:
            raise DistilError(f"--shard applies to task: causal_lm (this recipe is task: {recipe.task})",
                              field="--shard")
        return tasks.stage(recipe, "generate")
    train_ex, eval_ex = load_data(recipe)
    if recipe.data.expand:  # the teacher writes prompts first (cached rows like its answers), then answers them
        asked = fill_cache(recipe, expand.requests(train_ex, recipe.data.expand, recipe.data.expand_shots,
                                                   recipe.generate.seed), shard)
        try:
            written = expand.written_prompts(recipe, train_ex, eval_ex)
        except DistilError:
            if shard is None:
                raise
            return {"expand": asked}  # other shards' requests are not all answered yet: a re-run goes on
        return {**fill_cache(recipe, train_ex + written + eval_ex, shard), "expand": {**asked, "written": len(written)}}
    return fill_cache(recipe, train_ex + eval_ex, shard)


def training_examples(recipe: Recipe) -> tuple[list[Example], list[Example]]:
    """`load_data`, plus the prompts the teacher wrote for data.expand (read from the cache)."""
    train_ex, eval_ex = load_data(recipe)
    if recipe.data.expand:
        train_ex = train_ex + expand.written_prompts(recipe, train_ex, eval_ex)
    return train_ex, eval_ex


def train(recipe: Recipe, resume: bool = False) -> dict:
    """Train the student on the cached soft targets (and, with train.baseline, the cross-entropy baseline).

    Saves `<out>/student` (and `<out>/baseline`) as plain Hugging Face model folders. A run
    whose model folder already matches the recipe is skipped.
    """
    if recipe.task != "causal_lm":
        return tasks.stage(recipe, "train", resume=resume)
    from accelerate import PartialState

    from distil.training.loop import train_student

    train_ex, _ = training_examples(recipe)
    view = teacher_view(recipe)
    check_student(view)
    check_writable(recipe.out_dir, "out")
    keys = view.keys(train_ex)
    rows = view.student_rows(cached_rows(recipe, keys, "train"), train_ex)
    rows, keys = checked_answers(recipe, train_ex, rows, keys)
    # The baseline is the same student trained on the teacher's text alone.
    baseline = recipe.train.model_copy(update={"mode": "sequence", "hidden": None})
    runs = [("student", recipe.train, recipe.train.alpha)] + ([("baseline", baseline, 1.0)] if recipe.train.baseline else [])
    out = recipe.out_dir
    summaries = {}
    teacher = None
    for name, cfg, alpha in runs:
        fingerprint = run_fingerprint(recipe, keys, alpha)
        folder = out / name
        if is_trained(folder, fingerprint):
            summaries[name] = {"skipped": True, **json.loads((folder / "distil_train.json").read_text())["summary"]}
            continue
        online = cfg.mode == "on_policy" or cfg.hidden is not None
        builds_from_teacher = recipe.student.from_teacher is not None or recipe.student.config is not None
        if teacher is None and (builds_from_teacher or online):
            teacher = view.load_model()
        torch.manual_seed(recipe.train.seed)
        student = students.build_student(recipe.student, teacher)
        adapters = None
        if recipe.student.lora is not None:  # train adapters only; the loop sees the model inside peft's wrapper
            from distil.models import lora

            adapters = lora.wrap_student(student, recipe.student, out / f"{name}-lora")
            student = lora.inner(adapters)
        with progress_bar() as bar:
            summary = train_student(student, rows, cfg, pad_id=view.student_tokenizer.pad_token_id, out_dir=out,
                                    run_name=name, alpha=alpha, resume=resume, fingerprint=fingerprint,
                                    progress=bar, teacher=teacher if online else None,
                                    stop_ids=stop_token_ids(view.tokenizer, teacher) if online else frozenset(),
                                    max_new_tokens=recipe.generate.max_new_tokens)
        summaries[name] = summary
        if not PartialState().is_main_process:  # under `accelerate launch`, one process saves
            continue
        if adapters is not None:
            student = lora.save_and_merge(adapters, out / f"{name}-lora")
        save_trained(folder, student, view.student_tokenizer, {"fingerprint": fingerprint, "alpha": alpha,
                                                               "summary": summary})
    return summaries


def evaluate(recipe: Recipe) -> dict:
    """Score teacher, student and baseline on the held-out split; write report.json and report.html."""
    gates.parse_all(recipe.eval.gates)
    if recipe.task != "causal_lm":
        return tasks.stage(recipe, "evaluate")
    from distil.evaluation.scoring import evaluate_run

    _, eval_ex = load_data(recipe)
    view = teacher_view(recipe)
    check_writable(recipe.out_dir, "out")
    cached = cached_rows(recipe, view.keys(eval_ex), "held-out")
    rows = view.student_rows(cached, eval_ex)
    return evaluate_run(recipe, view, eval_ex, rows, teacher_rows=cached if is_cross_tokenizer(view) else None)


def export(recipe: Recipe) -> dict:
    """Write the recipe's `export.formats` from <out>/student into <out>/exports, score each with the
    student's metrics and add them to report.json / report.html (key "exports")."""
    if recipe.task != "causal_lm":
        return tasks.stage(recipe, "export")
    from distil.deploy.export import export_model
    from distil.deploy.scoring import add_to_report, evaluate_artifacts

    student_dir = recipe.out_dir / "student"
    if not student_dir.exists():
        raise DistilError("no trained student found; run `distil train` first", file=str(student_dir))
    _, eval_ex = load_data(recipe)
    view = teacher_view(recipe)
    rows = view.student_rows(cached_rows(recipe, view.keys(eval_ex), "held-out"), eval_ex)
    artifacts = []
    for fmt in recipe.export.formats:
        for quant in (recipe.export.quant if fmt == "gguf" else [None]):
            name = f"student-{fmt}-{quant}.gguf" if quant else f"student-{fmt}"
            artifacts.append(export_model(student_dir, fmt, recipe.out_dir / "exports" / name, quant))
    model_config = json.loads((student_dir / "config.json").read_text())
    stop_ids = {view.student_tokenizer.eos_token_id} | set(_as_list(model_config.get("eos_token_id")))
    exports = evaluate_artifacts(student_dir, artifacts, view.student_tokenizer, rows, [ex.reference for ex in eval_ex],
                                 stop_ids={i for i in stop_ids if i is not None},
                                 max_new_tokens=recipe.eval.max_new_tokens or recipe.generate.max_new_tokens,
                                 speed_prompts=recipe.eval.speed_prompts)
    add_to_report(recipe.out_dir, exports)
    return exports


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def run(recipe: Recipe) -> dict:
    """generate -> train (resuming from checkpoints) -> evaluate -> export (if the recipe asks);
    finished work is skipped."""
    gates.parse_all(recipe.eval.gates)  # a malformed gate fails now, not after the work
    if recipe.task == "causal_lm":  # fail on a bad pairing before the teacher's work, not after
        load_data(recipe)
        check_student(teacher_view(recipe))
        check_writable(recipe.out_dir, "out")
    timings = {}
    t = time.time()
    gen = generate(recipe)
    timings["generate"] = round(time.time() - t, 1)
    t = time.time()
    trained = train(recipe, resume=True)
    timings["train"] = round(time.time() - t, 1)
    t = time.time()
    report = evaluate(recipe)
    timings["evaluate"] = round(time.time() - t, 1)
    result = {"generate": gen, "train": trained, "report": report, "timings_s": timings}
    if recipe.export.formats:
        t = time.time()
        result["exports"] = export(recipe)
        timings["export"] = round(time.time() - t, 1)
    return result
