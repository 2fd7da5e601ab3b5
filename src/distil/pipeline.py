"""The four stages as functions: generate, train, evaluate, and run (all three in order).

Each takes a validated `Recipe`. Data files are checked before any model loads, and each
stage skips work that is already done (cached rows, a trained student with the same recipe).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from distil import models
from distil.cache import TeacherCache, row_key
from distil.data import Example, format_prompt, load_examples
from distil.errors import DistilError
from distil.progress import progress_bar
from distil.recipe import Recipe


def load_data(recipe: Recipe) -> tuple[list[Example], list[Example]]:
    """The train and held-out examples (validated; capped by data.max_train / data.max_eval)."""
    train = load_examples(recipe.resolve(recipe.data.train))
    held_out = load_examples(recipe.resolve(recipe.data.eval))
    return train[: recipe.data.max_train], held_out[: recipe.data.max_eval]


def generation_settings(recipe: Recipe) -> dict:
    """The settings that change what the teacher writes: part of every cache key."""
    g = recipe.generate
    settings = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample, "top_k": g.top_k,
                "max_prompt_tokens": recipe.data.max_prompt_tokens}
    if g.do_sample:
        settings.update(temperature=g.temperature, top_p=g.top_p, seed=g.seed)
    return settings


class TeacherPrompts:
    """The teacher's view of a recipe's examples: formatted prompts and their cache keys."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.source = models.resolve(recipe.teacher.model, recipe.teacher.gguf_file)
        self.tokenizer = models.load_tokenizer(self.source.directory, recipe.teacher.trust_remote_code)
        self.settings = generation_settings(recipe)

    def prompts(self, examples: list[Example]) -> list[str]:
        return [format_prompt(self.tokenizer, ex.messages, self.recipe.data.system_prompt) for ex in examples]

    def keys(self, examples: list[Example]) -> list[str]:
        return [row_key(self.source.identity, p, self.settings) for p in self.prompts(examples)]

    def load_model(self):
        return models.load_causal_lm(self.source.directory, self.recipe.teacher.dtype, self.recipe.teacher.trust_remote_code)


def _cached_rows(recipe: Recipe, keys: list[str], split: str) -> list[dict]:
    rows = TeacherCache(recipe.cache_dir).read(set(keys))
    missing = sum(k not in rows for k in keys)
    if missing:
        raise DistilError(f"{missing} of {len(keys)} {split} rows are not in the teacher cache; run `distil generate` first",
                          file=str(recipe.cache_dir))
    return [rows[k] for k in keys]


def generate(recipe: Recipe) -> dict:
    """Ask the teacher about every train and held-out prompt not yet cached; write cache shards.

    Returns a summary: rows total, generated now, already cached, tokens, seconds, tokens/s.
    """
    from distil.teachers.local import LocalTeacher

    train_ex, eval_ex = load_data(recipe)
    view = TeacherPrompts(recipe)
    prompts = view.prompts(train_ex + eval_ex)
    keys = view.keys(train_ex + eval_ex)
    cache = TeacherCache(recipe.cache_dir)
    cache.remove_stale_temporaries()
    done = cache.keys()
    todo: dict[str, str] = {k: p for k, p in zip(keys, prompts) if k not in done}
    summary = {"rows": len(set(keys)), "cached_before": len(set(keys)) - len(todo), "generated": 0, "tokens": 0,
               "seconds": 0.0, "cache": str(cache.root)}
    if not todo:
        return summary
    teacher = LocalTeacher(view.load_model(), view.tokenizer, view.source.identity, view.source.name)
    todo_keys, todo_prompts = list(todo), list(todo.values())
    t0 = time.time()
    with progress_bar() as bar:
        task = bar.add_task("generate", total=len(todo_keys), status="")
        for idx, gens in teacher.generate(todo_prompts, recipe.generate, max_prompt_tokens=recipe.data.max_prompt_tokens):
            cache.write_shard([{"key": todo_keys[i], "teacher": teacher.name, "prompt": todo_prompts[i], **g.__dict__}
                               for i, g in zip(idx, gens)])
            summary["generated"] += len(gens)
            summary["tokens"] += sum(len(g.token_ids) for g in gens)
            bar.update(task, advance=len(gens), status=f"{summary['tokens'] / (time.time() - t0):.0f} tok/s")
    summary["seconds"] = round(time.time() - t0, 2)
    summary["tokens_per_s"] = round(summary["tokens"] / summary["seconds"], 1)
    return summary


# Settings the cross-entropy-only baseline ignores: changing them must not retrain it.
_DIVERGENCE_ONLY = ("alpha", "loss", "temperature", "beta", "skew_alpha")


def _fingerprint(recipe: Recipe, keys: list[str], alpha: float) -> str:
    train = recipe.train.model_dump(exclude=set(_DIVERGENCE_ONLY) if alpha == 1.0 else None)
    blob = json.dumps({"student": recipe.student.model_dump(), "train": train, "alpha": alpha,
                       "keys": sorted(keys)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _is_done(folder: Path, fingerprint: str) -> bool:
    marker = folder / "distil_train.json"
    return marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint


def train(recipe: Recipe, resume: bool = False) -> dict:
    """Train the student on the cached soft targets (and, with eval.baseline, the cross-entropy baseline).

    Saves `<out>/student` (and `<out>/baseline`) as plain Hugging Face model folders. A run
    whose model folder already matches the recipe is skipped.
    """
    from accelerate import PartialState

    from distil.training import train_student

    train_ex, _ = load_data(recipe)
    view = TeacherPrompts(recipe)
    keys = view.keys(train_ex)
    rows = _cached_rows(recipe, keys, "train")
    runs = [("student", recipe.train.alpha)] + ([("baseline", 1.0)] if recipe.eval.baseline else [])
    out = recipe.out_dir
    summaries = {}
    teacher = None
    for name, alpha in runs:
        fingerprint = _fingerprint(recipe, keys, alpha)
        folder = out / name
        if _is_done(folder, fingerprint):
            summaries[name] = {"skipped": True, **json.loads((folder / "distil_train.json").read_text())["summary"]}
            continue
        if teacher is None and recipe.student.model is None:
            teacher = view.load_model()
        torch.manual_seed(recipe.train.seed)
        student = models.build_student(recipe.student, teacher)
        adapters = None
        if recipe.student.lora is not None:  # train adapters only; the loop sees the model inside peft's wrapper
            from distil import lora

            adapters = lora.wrap_student(student, recipe.student, out / f"{name}-lora")
            student = lora.inner(adapters)
        with progress_bar() as bar:
            summary = train_student(student, rows, recipe.train, pad_id=view.tokenizer.pad_token_id, out_dir=out,
                                    run_name=name, alpha=alpha, resume=resume, fingerprint=fingerprint,
                                    progress=bar)
        summaries[name] = summary
        if not PartialState().is_main_process:  # under `accelerate launch`, one process saves
            continue
        if adapters is not None:
            student = lora.save_and_merge(adapters, out / f"{name}-lora")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp)
        view.tokenizer.save_pretrained(tmp)
        (tmp / "distil_train.json").write_text(json.dumps({"fingerprint": fingerprint, "alpha": alpha, "summary": summary}, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return summaries


def evaluate(recipe: Recipe) -> dict:
    """Score teacher, student and baseline on the held-out split; write report.json and report.html."""
    from distil.evaluation import evaluate_run

    _, eval_ex = load_data(recipe)
    view = TeacherPrompts(recipe)
    rows = _cached_rows(recipe, view.keys(eval_ex), "held-out")
    return evaluate_run(recipe, view, eval_ex, rows)


def export(recipe: Recipe) -> dict:
    """Write the recipe's `export.formats` from <out>/student into <out>/exports, score each with the
    student's metrics and add them to report.json / report.html (key "exports")."""
    from distil.deploy_eval import add_to_report, evaluate_artifacts
    from distil.export import export_model

    student_dir = recipe.out_dir / "student"
    if not student_dir.exists():
        raise DistilError("no trained student found; run `distil train` first", file=str(student_dir))
    _, eval_ex = load_data(recipe)
    view = TeacherPrompts(recipe)
    rows = _cached_rows(recipe, view.keys(eval_ex), "held-out")
    artifacts = []
    for fmt in recipe.export.formats:
        for quant in (recipe.export.quant if fmt == "gguf" else [None]):
            name = f"student-{fmt}-{quant}.gguf" if quant else f"student-{fmt}"
            artifacts.append(export_model(student_dir, fmt, recipe.out_dir / "exports" / name, quant))
    model_config = json.loads((student_dir / "config.json").read_text())
    stop_ids = {view.tokenizer.eos_token_id} | set(_as_list(model_config.get("eos_token_id")))
    exports = evaluate_artifacts(student_dir, artifacts, view.tokenizer, rows, [ex.reference for ex in eval_ex],
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
