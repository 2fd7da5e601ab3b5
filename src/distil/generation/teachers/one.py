"""One teacher fills the cache: it answers the prompts not yet cached, and shards are written as they finish."""

from __future__ import annotations

import time

from distil.config.recipe import Recipe
from distil.data.examples import Example
from distil.generation.cache import TeacherCache
from distil.generation.teachers.local import LocalTeacher
from distil.generation.teachers.openai import generate_remote
from distil.generation.view import TeacherPrompts
from distil.progress import progress_bar


def generate_rows(recipe: Recipe, view: TeacherPrompts, examples: list[Example]) -> dict:
    """Ask `view`'s teacher about those of `examples` not yet cached (the body of `generate`, for one teacher)."""
    prompts = view.prompts(examples)
    keys = view.keys(examples)
    cache = TeacherCache(recipe.cache_dir, compact=recipe.generate.cache_format == "compact")
    cache.remove_stale_temporaries()
    done = cache.keys()
    todo: dict[str, str] = {k: p for k, p in zip(keys, prompts) if k not in done}
    summary = {"rows": len(set(keys)), "cached_before": len(set(keys)) - len(todo), "generated": 0, "tokens": 0,
               "seconds": 0.0, "cache": str(cache.store)}
    if not todo:
        return summary
    if recipe.teacher.type == "openai":
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


