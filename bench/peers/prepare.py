"""The shared work of every row: one recipe, the teacher's cache, the student's starting weights, TRL's data.

Everything a row needs is written once into the work folder:

    recipe.yaml         the distil recipe every distil row starts from (its paths made absolute)
    student-init/       the untrained student (distil's `student.from_teacher` builder), a plain HF folder
    train.jsonl         per training prompt: the chat messages and the teacher's cached answer (TRL's data)
    prepare.json        the settings, and the teacher's generation wall time (counted once)

The teacher cache is distil's own (`distil generate` on the recipe); TRL rows read the teacher's
answers from it, so every row sees the same prompts, the same teacher text and the same split.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from distil import pipeline
from distil.config.loading import load_recipe
from distil.data.splits import load_data
from distil.generation.view import TeacherPrompts, cached_rows
from distil.models import students


@dataclass(frozen=True)
class Settings:
    """What every row shares: the scale of the run and the one optimisation schedule."""
    base_recipe: str                   # teacher, data and generation settings come from this recipe
    layers: tuple[int, ...] = (0, 1)   # the student: these teacher layers, full MLP width
    max_train: int = 400
    max_eval: int | None = None        # None: the recipe's whole held-out file
    steps: int = 100
    batch_size: int = 8
    lr: float = 5e-4
    warmup: int = 10                   # linear warmup steps, then cosine to 0
    max_length: int = 256              # TRL's max_length; distil's rows (prompt + 48 answer tokens) are shorter
    seed: int = 0

    @classmethod
    def load(cls, work: Path) -> "Settings":
        data = json.loads((work / "prepare.json").read_text())["settings"]
        return cls(**{**data, "layers": tuple(data["layers"])})


def write_recipe(s: Settings, work: Path) -> Path:
    """The base recipe with the shared settings: student from the saved init folder, forward KL, alpha 0."""
    base_path = Path(s.base_recipe).resolve()
    base = yaml.safe_load(base_path.read_text())
    data = dict(base["data"], max_train=s.max_train)
    for key in ("train", "eval"):
        data[key] = str((base_path.parent / data[key]).resolve())
    if s.max_eval is not None:
        data["max_eval"] = s.max_eval
    recipe = {
        "teacher": base["teacher"],
        "student": {"model": str(work / "student-init")},
        "data": data,
        "generate": base.get("generate", {}),
        "train": {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "warmup": s.warmup,
                  "schedule": "cosine", "min_lr_ratio": 0.0, "seed": s.seed, "alpha": 0.0, "loss": "forward_kl",
                  "temperature": 1.0, "baseline": False, "checkpoint_every": s.steps + 1, "log_every": 5},
        "out": str(work / "runs" / "distil"),
        "cache": str(work / "cache"),
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def prepare(s: Settings, work: Path) -> dict:
    """Write the work folder (see the module docstring); returns prepare.json's content."""
    work.mkdir(parents=True, exist_ok=True)
    if (work / "prepare.json").exists():
        done = json.loads((work / "prepare.json").read_text())
        if done["settings"] == json.loads(json.dumps(dataclasses.asdict(s))):
            return done
    recipe_path = write_recipe(s, work)
    # The init folder must exist before the recipe validates; build it from the teacher first.
    first = load_recipe(recipe_path)
    view = TeacherPrompts(first)
    teacher = view.load_model()
    student = students.student_from_teacher(teacher, list(s.layers))
    student.save_pretrained(work / "student-init")
    view.tokenizer.save_pretrained(work / "student-init")
    del teacher, student

    recipe = load_recipe(recipe_path)
    start = time.perf_counter()
    pipeline.generate(recipe)
    generate_s = time.perf_counter() - start
    train_ex, held_out = load_data(recipe)
    rows = cached_rows(recipe, view.keys(train_ex), "train")
    with open(work / "train.jsonl", "w") as f:
        for ex, row in zip(train_ex, rows):
            f.write(json.dumps({"messages": ex.messages, "answer": row["text"]}, ensure_ascii=False) + "\n")
    done = {"settings": dataclasses.asdict(s), "generate_s": round(generate_s, 2), "train_rows": len(rows),
            "held_out_rows": len(held_out), "teacher": str(view.source.directory),
            "teacher_tokens": sum(len(r["token_ids"]) for r in rows),
            "max_new_tokens": recipe.generate.max_new_tokens}
    (work / "prepare.json").write_text(json.dumps(done, indent=2))
    return done


def teacher_dir(work: Path) -> Path:
    return Path(json.loads((work / "prepare.json").read_text())["teacher"])

