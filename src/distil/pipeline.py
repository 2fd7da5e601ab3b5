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

from distil import explain, models, tasks
from distil.cache import TeacherCache, row_key
from distil.data import Example, format_prompt, load_examples
from distil.errors import DistilError
from distil.progress import progress_bar
from distil.recipe import Recipe
from distil.teachers.local import stop_token_ids


def load_data(recipe: Recipe) -> tuple[list[Example], list[Example]]:
    """The train and held-out examples (validated; de-duplicated and balanced as the recipe says;
    capped by data.max_train / data.max_eval)."""
    train, held_out, _ = load_data_with_stats(recipe)
    return train, held_out


def load_data_with_stats(recipe: Recipe) -> tuple[list[Example], list[Example], dict]:
    """`load_data` plus what data quality removed: rows in, kept, rejected by reason, per-category counts."""
    from distil import quality

    d = recipe.data
    train = load_examples(recipe.resolve(d.train))
    held_out = load_examples(recipe.resolve(d.eval))
    stats = {}
    kept_train, why = quality.dedupe(train, d.dedupe, d.near_duplicate_threshold)
    kept_train, capped = quality.balance(kept_train, d.max_per_category, d.balance_categories)
    if d.max_train is not None and len(kept_train) > d.max_train:
        why["beyond_max_train"] = len(kept_train) - d.max_train
        kept_train = kept_train[: d.max_train]
    # A held-out prompt that repeats a training prompt would flatter the student.
    kept_eval, why_eval = quality.dedupe(held_out, d.dedupe, d.near_duplicate_threshold, against=kept_train)
    if d.max_eval is not None and len(kept_eval) > d.max_eval:
        why_eval["beyond_max_eval"] = len(kept_eval) - d.max_eval
        kept_eval = kept_eval[: d.max_eval]
    for split, before, after, reasons in (("train", train, kept_train, why + capped),
                                         ("held_out", held_out, kept_eval, why_eval)):
        stats[split] = {"rows_in": len(before), "kept": len(after), "rejected": dict(reasons),
                        "per_category_before": quality.per_category(before),
                        "per_category_after": quality.per_category(after)}
    return kept_train, kept_eval, stats


def _checked_answers(recipe: Recipe, examples: list[Example], rows: list[dict], keys: list[str]):
    """Leave out teacher answers that fail data.reject's checks; record the data section for the report."""
    from distil import quality

    d = recipe.data
    _, _, stats = load_data_with_stats(recipe)
    problems = [quality.answer_problem(r, ex, d.reject, d.min_reference_f1) if d.reject else None
                for r, ex in zip(rows, examples)]
    train = stats["train"]
    for why in filter(None, problems):
        train["rejected"][why] = train["rejected"].get(why, 0) + 1
    kept = [i for i, p in enumerate(problems) if p is None]
    if not kept:
        raise DistilError(f"every one of the {len(rows)} teacher answers failed data.reject's checks "
                          f"({', '.join(d.reject)})", field="data.reject")
    train["kept"] = len(kept)
    train["per_category_after"] = quality.per_category([examples[i] for i in kept])
    recipe.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = recipe.out_dir / "data_quality.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2))
    os.replace(tmp, recipe.out_dir / "data_quality.json")
    return [rows[i] for i in kept], [keys[i] for i in kept]


def generation_settings(recipe: Recipe) -> dict:
    """The settings that change what the teacher writes: part of every cache key."""
    g = recipe.generate
    settings = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample, "top_k": g.top_k,
                "max_prompt_tokens": recipe.data.max_prompt_tokens}
    if recipe.teacher.type == "openai":
        settings.update(top_k=recipe.teacher.top_logprobs, endpoint=recipe.teacher.endpoint)
    elif recipe.teacher.dtype != "float32":  # a lower precision writes other text (float32 keys stay as they were)
        settings["dtype"] = recipe.teacher.dtype
    if g.do_sample:
        settings.update(temperature=g.temperature, top_p=g.top_p, seed=g.seed)
    return settings


class TeacherPrompts:
    """The teacher's view of a recipe's examples: formatted prompts and their cache keys.

    `student_tokenizer` is the tokenizer the student reads: the teacher's, or with
    train.cross_tokenizer the student's own (`student_rows` then re-expresses cache rows in it).
    """

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        t = recipe.teacher
        if t.type == "openai":
            self.source = _remote_source(recipe)
        else:
            self.source = models.resolve(t.model, t.gguf_file, field="teacher.model")
        self.tokenizer = models.load_tokenizer(self.source.directory, t.trust_remote_code)
        if t.chat_template is not None:  # e.g. a base model whose tokenizer has no template
            self.tokenizer.chat_template = t.chat_template
        self.settings = generation_settings(recipe)
        self.student_tokenizer = self.tokenizer
        own = models.student_tokenizer_source(recipe.student) if recipe.train.cross_tokenizer else None
        if own is not None:
            self.student_tokenizer = models.load_tokenizer(own[0])

    def prompts(self, examples: list[Example]) -> list[str]:
        """What the teacher is asked (with generate.explain, its instruction added to the system prompt)."""
        return [format_prompt(self.tokenizer, *explain.teacher_chat(ex.messages, self.recipe)) for ex in examples]

    def student_rows(self, rows: list[dict], examples: list[Example]) -> list[dict]:
        """The cached rows as the student sees them: with generate.explain, after the plain prompt, not the
        teacher's (the student learns to reason without being told to); with train.cross_tokenizer, in
        the student's vocabulary after its own plain prompt (`_aligned`)."""
        if self.student_tokenizer is not self.tokenizer:
            return self._aligned(rows, examples)
        if not self.recipe.generate.explain:
            return rows
        plain = [format_prompt(self.tokenizer, ex.messages, self.recipe.data.system_prompt) for ex in examples]
        return explain.with_prompts(rows, plain, self.tokenizer, self.recipe.data.max_prompt_tokens)

    def keys(self, examples: list[Example]) -> list[str]:
        return [row_key(self.source.identity, p, self.settings) for p in self.prompts(examples)]

    def load_model(self):
        return models.load_causal_lm(self.source.directory, self.recipe.teacher.dtype, self.recipe.teacher.trust_remote_code)

    def _aligned(self, rows: list[dict], examples: list[Example]) -> list[dict]:
        """Cache rows re-expressed in the student's vocabulary (distil.align), after its own chat template."""
        from distil.align import StudentAligner

        aligner = StudentAligner(self.tokenizer, self.student_tokenizer, _teacher_stop_ids(self),
                                 self.student_tokenizer.eos_token_id)
        tok, limit = self.student_tokenizer, self.recipe.data.max_prompt_tokens
        out = []
        for ex, row in zip(examples, rows):
            prompt = format_prompt(tok, ex.messages, self.recipe.data.system_prompt)
            ids = tok(prompt, add_special_tokens=not tok.chat_template)["input_ids"][-limit:]
            out.append(aligner.convert(row, ids))
        self.alignment = aligner.stats.as_dict()
        return out


def _teacher_stop_ids(view: TeacherPrompts) -> set[int]:
    """The teacher's stop tokens, read from its config files (no weights loaded)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(view.source.directory)
    except OSError:
        generation = GenerationConfig()
    config = AutoConfig.from_pretrained(view.source.directory)
    return stop_token_ids(view.tokenizer, SimpleNamespace(config=config, generation_config=generation))


def _cross(view) -> bool:
    """Whether the student reads another tokenizer than the view's teacher (train.cross_tokenizer)."""
    return view.student_tokenizer is not view.tokenizer


def teacher_view(recipe: Recipe):
    """The recipe's teacher(s): a `TeacherPrompts`, or for `teachers:` a `distil.teachers.many.Teachers`
    with the same methods (prompts are per teacher, keys per row)."""
    if recipe.teachers is None:
        return TeacherPrompts(recipe)
    from distil.teachers.many import Teachers

    return Teachers(recipe)


def _remote_source(recipe: Recipe) -> models.ResolvedModel:
    """An endpoint teacher stands on a local model for its tokenizer (and weights, for student.from_teacher)."""
    t = recipe.teacher
    local = t.local_model or recipe.student.model
    if local is None:
        raise DistilError("a type: openai teacher needs teacher.local_model (a local model with the served model's "
                          "tokenizer) unless the student is given as student.model", field="teacher.local_model")
    base = models.resolve(local, field="teacher.local_model" if t.local_model else "student.model")
    identity = hashlib.sha256(f"openai:{t.model}:{base.identity}".encode()).hexdigest()
    return models.ResolvedModel(base.directory, identity, t.model)


def check_writable(folder: Path, field: str) -> None:
    """Fail before any work if `folder` cannot be created or written (a file in the way, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".distil-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DistilError(f"cannot write to this folder: {e.strerror or e}", file=str(folder), field=field) from None


def _check_student(view: TeacherPrompts) -> None:
    """The student can learn from the view's teacher in the way its recipe asks (see models.check_pairing).

    With several teachers, from the first one (whose model builds the student and teaches online).
    """
    recipe = view.recipe
    local = recipe.teacher.type == "local"
    cross = recipe.train.cross_tokenizer
    if cross and not isinstance(view, TeacherPrompts):
        raise DistilError("train.cross_tokenizer takes one teacher (`teacher:`), not `teachers:`",
                          field="train.cross_tokenizer")
    if cross and not local:
        raise DistilError("train.cross_tokenizer needs a local teacher (an endpoint's tokens are mapped to the "
                          "student's by their bytes instead, docs/teachers.md)", field="train.cross_tokenizer")
    if cross and (recipe.train.mode == "on_policy" or recipe.train.hidden is not None):
        raise DistilError("train.cross_tokenizer works on cached teacher text (mode: supervised or sequence, "
                          "no train.hidden)", field="train.hidden" if recipe.train.hidden else "train.mode")
    loss = recipe.train.loss
    if cross in ("offsets", "both") and "reverse_kl" in ([loss] if isinstance(loss, str) else loss):
        raise DistilError("reverse_kl is infinite on cross-tokenizer targets (student ids the teacher gives no "
                          "mass); use forward_kl, jsd, skew_kl, skew_reverse_kl or tvd", field="train.loss")
    if not local and (recipe.train.mode == "on_policy" or recipe.train.hidden is not None):
        raise DistilError("needs a local teacher (an endpoint gives neither scores for the student's own text "
                          "nor hidden states)", field="train.hidden" if recipe.train.hidden else "train.mode")
    # An endpoint teacher's size is unknown: its local stand-in only lends the tokenizer.
    models.check_pairing(recipe.student, view.source.directory, view.tokenizer, compare_size=local,
                         cross_tokenizer=cross)


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
    if recipe.task != "causal_lm":
        return tasks.stage(recipe, "generate")
    train_ex, eval_ex = load_data(recipe)
    if recipe.teachers is not None:
        from distil.teachers.many import generate_many

        return generate_many(recipe, train_ex + eval_ex)
    view = TeacherPrompts(recipe)
    check_writable(recipe.cache_dir, "cache")
    return generate_rows(recipe, view, train_ex + eval_ex)


def generate_rows(recipe: Recipe, view: TeacherPrompts, examples: list[Example]) -> dict:
    """Ask `view`'s teacher about those of `examples` not yet cached (the body of `generate`, for one teacher)."""
    from distil.teachers.local import LocalTeacher

    prompts = view.prompts(examples)
    keys = view.keys(examples)
    cache = TeacherCache(recipe.cache_dir)
    cache.remove_stale_temporaries()
    done = cache.keys()
    todo: dict[str, str] = {k: p for k, p in zip(keys, prompts) if k not in done}
    summary = {"rows": len(set(keys)), "cached_before": len(set(keys)) - len(todo), "generated": 0, "tokens": 0,
               "seconds": 0.0, "cache": str(cache.root)}
    if not todo:
        return summary
    if recipe.teacher.type == "openai":
        from distil.teachers.openai import generate_remote

        messages = dict(zip(keys, (ex.messages for ex in examples)))
        return generate_remote(recipe, view, [(k, p, messages[k]) for k, p in todo.items()], cache, summary)
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
_DIVERGENCE_ONLY = ("alpha", "loss", "temperature", "beta", "skew_alpha", "mode", "lambda_", "hidden", "cross_tokenizer",
                    "uld_weight")


def _fingerprint(recipe: Recipe, keys: list[str], alpha: float) -> str:
    # Keys added for cross-tokenizer runs stay out while unset, so earlier runs keep their fingerprint.
    unset = {k for k in ("cross_tokenizer", "uld_weight") if k not in recipe.train.model_fields_set}
    train = recipe.train.model_dump(exclude=(set(_DIVERGENCE_ONLY) if alpha == 1.0 else set()) | unset)
    student = recipe.student.model_dump(exclude={"from_model"} if recipe.student.from_model is None else None)
    blob = json.dumps({"student": student, "train": train, "alpha": alpha,
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
    if recipe.task != "causal_lm":
        return tasks.stage(recipe, "train", resume=resume)
    from accelerate import PartialState

    from distil.training import train_student

    train_ex, _ = load_data(recipe)
    view = teacher_view(recipe)
    _check_student(view)
    check_writable(recipe.out_dir, "out")
    keys = view.keys(train_ex)
    rows = view.student_rows(_cached_rows(recipe, keys, "train"), train_ex)
    rows, keys = _checked_answers(recipe, train_ex, rows, keys)
    # The baseline is the same student trained on the teacher's text alone.
    baseline = recipe.train.model_copy(update={"mode": "sequence", "hidden": None})
    runs = [("student", recipe.train, recipe.train.alpha)] + ([("baseline", baseline, 1.0)] if recipe.eval.baseline else [])
    out = recipe.out_dir
    summaries = {}
    teacher = None
    for name, cfg, alpha in runs:
        fingerprint = _fingerprint(recipe, keys, alpha)
        folder = out / name
        if _is_done(folder, fingerprint):
            summaries[name] = {"skipped": True, **json.loads((folder / "distil_train.json").read_text())["summary"]}
            continue
        online = cfg.mode == "on_policy" or cfg.hidden is not None
        builds_from_teacher = recipe.student.from_teacher is not None or recipe.student.config is not None
        if teacher is None and (builds_from_teacher or online):
            teacher = view.load_model()
        torch.manual_seed(recipe.train.seed)
        student = models.build_student(recipe.student, teacher)
        adapters = None
        if recipe.student.lora is not None:  # train adapters only; the loop sees the model inside peft's wrapper
            from distil import lora

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
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp)
        view.student_tokenizer.save_pretrained(tmp)
        (tmp / "distil_train.json").write_text(json.dumps({"fingerprint": fingerprint, "alpha": alpha, "summary": summary}, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return summaries


def evaluate(recipe: Recipe) -> dict:
    """Score teacher, student and baseline on the held-out split; write report.json and report.html."""
    if recipe.task != "causal_lm":
        return tasks.stage(recipe, "evaluate")
    from distil.evaluation import evaluate_run

    _, eval_ex = load_data(recipe)
    view = teacher_view(recipe)
    check_writable(recipe.out_dir, "out")
    cached = _cached_rows(recipe, view.keys(eval_ex), "held-out")
    rows = view.student_rows(cached, eval_ex)
    return evaluate_run(recipe, view, eval_ex, rows, teacher_rows=cached if _cross(view) else None)


def export(recipe: Recipe) -> dict:
    """Write the recipe's `export.formats` from <out>/student into <out>/exports, score each with the
    student's metrics and add them to report.json / report.html (key "exports")."""
    if recipe.task != "causal_lm":
        return tasks.stage(recipe, "export")
    from distil.deploy_eval import add_to_report, evaluate_artifacts
    from distil.export import export_model

    student_dir = recipe.out_dir / "student"
    if not student_dir.exists():
        raise DistilError("no trained student found; run `distil train` first", file=str(student_dir))
    _, eval_ex = load_data(recipe)
    view = teacher_view(recipe)
    rows = view.student_rows(_cached_rows(recipe, view.keys(eval_ex), "held-out"), eval_ex)
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
    if recipe.task == "causal_lm":  # fail on a bad pairing before the teacher's work, not after
        load_data(recipe)
        _check_student(teacher_view(recipe))
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
