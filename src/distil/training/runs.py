"""The training runs a recipe asks for (the student and its cross-entropy baseline): fingerprints, and whether a run is already done."""

from __future__ import annotations

import json
from pathlib import Path

from distil.config.recipe import Recipe
from distil.files import sha256_text, write_atomic

# Settings the cross-entropy-only baseline ignores: changing them must not retrain it.
DIVERGENCE_ONLY = ("alpha", "loss", "temperature", "beta", "skew", "mode", "lambda_", "hidden", "cross_tokenizer",
                    "uld_weight")


def run_fingerprint(recipe: Recipe, keys: list[str], alpha: float) -> str:
    # Keys added for cross-tokenizer runs stay out while unset, so earlier runs keep their fingerprint.
    unset = {k for k in ("cross_tokenizer", "uld_weight", "adam_betas") if k not in recipe.train.model_fields_set}
    if recipe.train.mixed_precision == "no":  # added later: full-precision runs keep their fingerprint
        unset.add("mixed_precision")
    # Whether the baseline is trained, where metrics are reported and whether activations are recomputed
    # do not change what a run computes.
    train = recipe.train.model_dump(exclude=(set(DIVERGENCE_ONLY) if alpha == 1.0 else set()) | unset
                                    | {"baseline", "report_to", "gradient_checkpointing"})
    if "skew" in train:  # renamed from skew_alpha: earlier runs keep their fingerprint
        train["skew_alpha"] = train.pop("skew")
    student = recipe.student.model_dump(exclude={"from_model"} if recipe.student.from_model is None else None)
    blob = json.dumps({"student": student, "train": train, "alpha": alpha,
                       "keys": sorted(keys)}, sort_keys=True)
    return sha256_text(blob)


def is_trained(folder: Path, fingerprint: str) -> bool:
    marker = folder / "distil_train.json"
    return marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint




def save_trained(folder: Path, model, tokenizer, marker: dict) -> None:
    """A trained model as a plain Hugging Face folder, with `distil_train.json` (`marker`: its fingerprint
    and summary) telling later runs it is done; written atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "distil_train.json").write_text(json.dumps(marker, indent=2))

    write_atomic(folder, write)
