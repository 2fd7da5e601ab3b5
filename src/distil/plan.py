"""`distil plan`: what a recipe will cost before it runs, from a short calibration run of the recipe itself.

The calibration generates a few rows with the recipe's teacher and trains its student a few steps,
in a temporary folder (the recipe's cache and out are untouched), and scales what it measured to
the whole recipe: rows, teacher tokens, cache bytes, generation and training seconds, peak memory
per device and the train process's peak resident set, and the teacher's price for hosted teachers.
Memory is measured, not modelled: the bytes of the student's weights, of its gradients and AdamW
state, and of the tensors one forward keeps for backward (`distil.training.memory`), under the
recipe's own mixed precision and gradient checkpointing.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distil import pipeline
from distil.config.recipe import Recipe
from distil.data.batches import collate
from distil.data.splits import load_data
from distil.errors import DistilError
from distil.generation.cache import TeacherCache
from distil.generation.decoding import encode_prompt
from distil.generation.stage import teacher_view
from distil.generation.view import cached_rows
from distil.models import students
from distil.training.loop import cpu_only, prepare_student
from distil.training.memory import parameter_bytes, resident_bytes, saved_activation_bytes
from distil.training.objective import DistillationObjective

UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, per trainable parameter
CHUNK_TOKENS = 2048  # DistillationObjective's default chunk


def parse_memory(text: str) -> int:
    """'24GB', '24 GiB', '800MB', '1e9' -> bytes; anything else a DistilError naming --memory."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise DistilError(f"expected a size such as 24GB or 80GiB (got {text!r})", field="--memory")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def teacher_cost(teacher, prompt_tokens: float, completion_tokens: float) -> dict | None:
    """What a hosted teacher (type: openai) charges for the tokens, at teacher.price_input_per_mtok and
    teacher.price_output_per_mtok (per million); None for a local teacher or `teachers:`.

    Example:
        >>> teacher_cost(TeacherConfig(type="openai", model="m", base_url="http://h/v1", price_input_per_mtok=0.5,
        ...                            price_output_per_mtok=1.5), 2e6, 1e6)["usd"]
        2.5
    """
    if teacher is None or teacher.type != "openai":
        return None
    return {"prompt_tokens": round(prompt_tokens), "completion_tokens": round(completion_tokens),
            "usd": round(prompt_tokens / 1e6 * teacher.price_input_per_mtok
                         + completion_tokens / 1e6 * teacher.price_output_per_mtok, 4),
            "priced_by": "teacher.price_input_per_mtok, teacher.price_output_per_mtok"}


def calibration_recipe(recipe: Recipe, folder: Path, rows: int, steps: int) -> Recipe:
    """The recipe cut to `rows` training prompts (and one held-out) and `steps` steps, its cache and out in `folder`."""
    data = recipe.data.model_copy(update={"max_train": rows, "max_eval": 1})
    train = recipe.train.model_copy(update={"steps": steps, "baseline": False, "log_every": 1,
                                            "checkpoint_every": steps + 1, "report_to": [], "warmup": 0})
    return recipe.model_copy(update={"data": data, "train": train, "cache": str(folder / "cache"),
                                     "out": str(folder / "out")})


def longest_row(recipe: Recipe, view, examples) -> int:
    """Tokens of the longest row training can meet: the longest prompt of the data as the teacher is asked it
    (cut to data.max_prompt_tokens), plus generate.max_new_tokens."""
    longest = max(len(encode_prompt(view.tokenizer, p, recipe.data.max_prompt_tokens)) for p in view.prompts(examples))
    return longest + recipe.generate.max_new_tokens


def measure_memory(recipe: Recipe, calib: Recipe, longest: int) -> dict:
    """Bytes per device of one training step of `recipe`'s student, its micro-batch of rows `longest` tokens long."""
    view = teacher_view(calib)
    train_ex, _ = load_data(calib)
    keys = view.keys(train_ex)
    rows = view.student_rows(cached_rows(calib, keys, "train"), train_ex)
    cfg = recipe.train
    online = cfg.mode == "on_policy" or cfg.hidden is not None
    needs_teacher = online or recipe.student.from_teacher is not None or recipe.student.config is not None
    teacher = view.load_model() if needs_teacher else None
    torch.manual_seed(0)
    student = students.build_student(recipe.student, teacher)
    if recipe.student.lora is not None:
        from distil.models import lora

        student = lora.inner(lora.wrap_student(student, recipe.student, Path(calib.out) / "lora"))
    prepare_student(student, cfg)
    student.train()
    weights, trainable = parameter_bytes(student)
    # The longest micro-batch the calibration saw, then scaled to batch_size rows of the longest row possible.
    batch_rows = sorted(rows, key=lambda r: len(r["prompt_ids"]) + len(r["token_ids"]), reverse=True)[:cfg.batch_size]
    batch = collate(batch_rows, view.student_tokenizer.pad_token_id)
    objective = DistillationObjective(student, alpha=cfg.alpha, temperature=cfg.temperature, loss=cfg.loss)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
        _, saved = saved_activation_bytes(lambda: objective(batch)[0], objective)
    padded = batch.input_ids.numel()
    activations = saved / padded * cfg.batch_size * longest
    vocab = student.get_output_embeddings().weight.shape[0]
    # Backward through one loss chunk holds its float32 logits and their gradient at once.
    chunk = min(CHUNK_TOKENS, cfg.batch_size * recipe.generate.max_new_tokens)
    # Gradients and AdamW's two moments have the trainable parameters' dtype (float32 master weights).
    parts = {"weights": weights, "gradients": trainable, "optimizer": ADAMW_STATES * trainable,
             "activations": int(activations), "loss_chunk": 2 * chunk * vocab * 4}
    teacher_bytes = parameter_bytes(teacher)[0] if teacher is not None else 0
    if online:
        parts["teacher"] = teacher_bytes
    return {"parts": parts, "teacher_bytes": teacher_bytes, "longest_row_tokens": longest,
            "measured_batch": {"batch_rows": len(batch_rows), "padded_tokens": padded, "saved_bytes": saved}}


def plan(recipe: Recipe, memory: int | None = None, rows: int | None = None, steps: int = 5) -> dict:
    """Calibrate `recipe` on a few rows and steps and scale to the whole run; see the module docstring.

    Args:
        memory: bytes one device has; a recipe that needs more raises a DistilError naming the key to change.
        rows: training prompts in the calibration (default: two generation batches, at least one step). One
            batch alone decodes at falling occupancy as its rows finish; a whole run keeps the batch full but for
            its last batch, so a one-batch calibration undercounts rows/s (draft recipe: 1.56 against 3.29).
        steps: training steps in the calibration (at least 2: the first one warms up).

    Returns:
        The plan: rows, teacher_tokens, cache_bytes, generate_seconds, train_seconds, memory_per_device
        (bytes by part and total), cost (hosted teachers) and what the calibration measured.
    """
    if recipe.task != "causal_lm":
        raise DistilError(f"distil plan covers task: causal_lm (this recipe is task: {recipe.task})", field="task")
    runtime = resident_bytes()  # Python, torch and transformers: in the train process too
    train_ex, eval_ex = load_data(recipe)
    total_rows = len(train_ex) + len(eval_ex)
    cfg, gen = recipe.train, recipe.generate
    rows = min(len(train_ex), rows or max(2 * gen.batch_size, cfg.batch_size * cfg.grad_accum))
    steps = max(2, steps)
    with tempfile.TemporaryDirectory(prefix="distil-plan-") as tmp:
        calib = calibration_recipe(recipe, Path(tmp), rows, steps)
        t0 = time.time()
        generated = pipeline.generate(calib)
        generate_wall = time.time() - t0
        cache = TeacherCache(calib.cache_dir)
        stats, cached, shard_count = cache.stats(), list(cache.read().values()), len(list(cache.shards()))
        t0 = time.time()
        trained = pipeline.train(calib)["student"]
        train_wall = time.time() - t0
        log = [json.loads(line) for line in
               (Path(calib.out) / "logs" / "student.jsonl").read_text().splitlines() if line.strip()]
        mem = measure_memory(recipe, calib, longest_row(recipe, teacher_view(recipe), train_ex))

    # Generation: a fixed part (loading the teacher) and seconds per row.
    per_row = generated["seconds"] / max(1, generated["generated"])
    generate_seconds = (generate_wall - generated["seconds"]) + per_row * total_rows
    completion_per_row = stats["tokens"] / max(1, stats["rows"])
    prompt_per_row = sum(len(r["prompt_ids"]) for r in cached) / max(1, len(cached))
    completion_tokens, prompt_tokens = completion_per_row * total_rows, prompt_per_row * total_rows
    # Cache: bytes per generated token of the stored columns, plus each shard file's fixed part (footer, schema).
    data_per_token = sum(stats["bytes_per_token_parts"].values())
    shards = max(1, shard_count)
    per_shard = max(0.0, stats["bytes"] - data_per_token * stats["tokens"]) / shards
    cache_bytes = per_shard * math.ceil(total_rows / gen.shard_rows) + data_per_token * completion_tokens
    # Training: the first step (warm-up), then steady steps; the rest of the wall time (building, saving) once a run.
    # The median step after the first: the first steps of a fresh process run slower (allocator, kernels warming).
    first = log[0]["elapsed_s"]
    steady = statistics.median(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(log, log[1:]))
    loop_seconds = first + steady * (cfg.steps - 1)
    runs = 2 if cfg.baseline else 1
    train_seconds = runs * ((train_wall - trained["seconds"]) + loop_seconds)
    parts = mem["parts"]
    total = sum(parts.values())
    cost = teacher_cost(recipe.teacher, prompt_tokens, completion_tokens)
    # The train process's peak resident set: the runtime, the teacher's weights (loaded on the host to build the
    # student or score online, kept for the baseline), and, training on the CPU, the rest of the device's memory.
    device = total - parts.get("teacher", 0) if cpu_only() else 0
    host = runtime + mem["teacher_bytes"] + device
    result = {
        "rows": total_rows,
        "teacher_tokens": {"prompt": round(prompt_tokens), "completion": round(completion_tokens)},
        "cache_bytes": round(cache_bytes),
        "generate_seconds": round(generate_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "memory_per_device": {**parts, "total": total},
        "memory_per_device_readable": {k: gigabytes(v) for k, v in {**parts, "total": total}.items()},
        "train_peak_rss": {"runtime": runtime, "teacher": mem["teacher_bytes"], "device": device,
                           "total": host, "readable": gigabytes(host)},
        "cost": cost,
        "calibration": {"rows": rows, "steps": steps, "generate_rows_per_s": round(1 / per_row, 2) if per_row else None,
                        "train_seconds_per_step": round(steady, 4), "cache_bytes_per_token": stats["bytes_per_token"],
                        "tokens_per_step": round(trained["tokens"] / steps), "first_step_seconds": first,
                        "train_fixed_seconds": round(train_wall - trained["seconds"], 3), **mem["measured_batch"],
                        "activations_at": f"{cfg.batch_size} rows x {mem['longest_row_tokens']} tokens (the "
                                          "longest prompt + generate.max_new_tokens)"},
    }
    if memory is not None and total > memory:
        raise DistilError(_advice(recipe, parts, total, memory), field=_key_to_change(recipe, parts))
    return result


def _key_to_change(recipe: Recipe, parts: dict) -> str:
    """The recipe key whose change frees most memory: the largest part decides."""
    biggest = max(parts, key=parts.get)
    if biggest == "activations" and not recipe.train.gradient_checkpointing:
        return "train.gradient_checkpointing"
    if biggest in ("activations", "loss_chunk"):
        return "train.batch_size"
    if biggest == "teacher":
        return "teacher.dtype"
    return "student.lora" if recipe.student.lora is None else "student"


def _advice(recipe: Recipe, parts: dict, total: int, memory: int) -> str:
    biggest = max(parts, key=parts.get)
    key = _key_to_change(recipe, parts)
    change = {"train.gradient_checkpointing": "set train.gradient_checkpointing: true",
              "train.batch_size": f"lower train.batch_size (now {recipe.train.batch_size}; raise train.grad_accum "
                                  "to keep the step)",
              "teacher.dtype": "load the teacher in bfloat16 or int8 (teacher.dtype)",
              "student.lora": "train LoRA adapters (student.lora) or shard with configs/accelerate/fsdp2.yaml",
              "student": "use a smaller student or shard with configs/accelerate/fsdp2.yaml"}[key]
    return (f"needs about {gigabytes(total)} per device, more than --memory {gigabytes(memory)} "
            f"({biggest} {gigabytes(parts[biggest])}); {change}")
