"""The train and held-out splits a recipe names, cleaned as it says; teacher answers checked before training."""

from __future__ import annotations

from distil.config.recipe import Recipe
from distil.data.examples import Example, load_examples
from distil.errors import DistilError
from distil.files import write_json


def load_data(recipe: Recipe) -> tuple[list[Example], list[Example]]:
    """The train and held-out examples (validated; de-duplicated and balanced as the recipe says;
    capped by data.max_train / data.max_eval)."""
    train, held_out, _ = load_data_with_stats(recipe)
    return train, held_out


def load_data_with_stats(recipe: Recipe) -> tuple[list[Example], list[Example], dict]:
    """`load_data` plus what data quality removed: rows in, kept, rejected by reason, per-category counts."""
    from distil.data import quality

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


def checked_answers(recipe: Recipe, examples: list[Example], rows: list[dict], keys: list[str]):
    """Leave out teacher answers that fail data.reject's checks; record the data section for the report."""
    from distil.data import quality

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
    write_json(recipe.out_dir / "data_quality.json", stats)
    return [rows[i] for i in kept], [keys[i] for i in kept]


