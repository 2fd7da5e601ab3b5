"""One function per row of the table: TRL's real trainers and distil's own training, on the same work.

Each takes the work folder written by `prepare` and an output folder, trains the student from
work/student-init, saves it there as a plain Hugging Face folder and returns
{"steps", "loop_s"}: optimizer steps done and the seconds of the training loop itself.

Shared by every row: the student's starting weights, the training prompts and the teacher's answers
to them (distil's cache), steps, batch size, peak lr, 10 warmup steps then cosine to 0, max gradient
norm 1.0, weight decay 0, seed. What each trainer does by its own defaults (AdamW betas, warmup
shape, batch order) stays its own: that is what a user of each gets.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.peers.prepare import Settings, teacher_dir

# distil's recipe keys per distil row (on top of work/recipe.yaml: forward KL, alpha 0, the shared schedule)
DISTIL_ROWS = {
    "distil-supervised": [],
    "distil-on-policy": ["train.mode=on_policy", "train.lambda=0.5"],
    "distil-ce": ["train.alpha=1.0"],
}


def _trl_data(work: Path, kind: str):
    """The training prompts and the teacher's answers as a `datasets.Dataset` in TRL's formats."""
    from datasets import Dataset

    rows = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    answer = lambda r: [{"role": "assistant", "content": r["answer"]}]  # noqa: E731
    if kind == "prompt-completion":  # SFTTrainer: loss on the completion only
        return Dataset.from_list([{"prompt": r["messages"], "completion": answer(r)} for r in rows])
    if kind == "messages":  # GKDTrainer's ChatML collator
        return Dataset.from_list([{"messages": r["messages"] + answer(r)} for r in rows])
    return Dataset.from_list([{"prompt": r["messages"]} for r in rows])  # DistillationTrainer writes its own


def _common(s: Settings, out: Path) -> dict:
    """TrainingArguments every TRL row shares (the schedule and batch of distil's recipe)."""
    return dict(output_dir=str(out / "trainer"), max_steps=s.steps, per_device_train_batch_size=s.batch_size,
                gradient_accumulation_steps=1, learning_rate=s.lr, lr_scheduler_type="cosine", warmup_steps=s.warmup,
                weight_decay=0.0, max_grad_norm=1.0, seed=s.seed, data_seed=s.seed, bf16=False, fp16=False,
                use_cpu=True, gradient_checkpointing=False, save_strategy="no", report_to=[], logging_steps=10,
                dataloader_num_workers=0, disable_tqdm=True)


def _models(work: Path, with_teacher: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(work / "student-init", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(work / "student-init")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir(work), dtype="float32") if with_teacher else None
    return student, tokenizer, teacher


def _finish(trainer, out: Path, tokenizer) -> dict:
    result = trainer.train()
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"steps": result.global_step, "loop_s": round(result.metrics["train_runtime"], 2)}


def trl_sft(work: Path, out: Path) -> dict:
    from trl import SFTConfig, SFTTrainer

    s = Settings.load(work)
    student, tokenizer, _ = _models(work, with_teacher=False)
    args = SFTConfig(**_common(s, out), max_length=s.max_length, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=student, args=args, train_dataset=_trl_data(work, "prompt-completion"),
                         processing_class=tokenizer)
    return _finish(trainer, out, tokenizer)


def trl_gkd(work: Path, out: Path, lmbda: float) -> dict:
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    s = Settings.load(work)
    student, tokenizer, teacher = _models(work, with_teacher=True)
    max_new = json.loads((work / "prepare.json").read_text())["max_new_tokens"]
    # beta 0: forward KL(teacher || student) over the full vocabulary; temperature 1 as distil's rows
    args = GKDConfig(**_common(s, out), max_length=s.max_length, lmbda=lmbda, beta=0.0, temperature=1.0,
                     max_new_tokens=max_new)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_trl_data(work, "messages"),
                         processing_class=tokenizer)
    return _finish(trainer, out, tokenizer)


def trl_distillation(work: Path, out: Path) -> dict:
    from trl import DistillationConfig, DistillationTrainer

    s = Settings.load(work)
    student, tokenizer, teacher = _models(work, with_teacher=True)
    max_new = json.loads((work / "prepare.json").read_text())["max_new_tokens"]
    # Fully on-policy (the student writes every completion); beta 0: forward KL, as the other KD rows.
    args = DistillationConfig(**_common(s, out), max_completion_length=max_new, beta=0.0, temperature=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=_trl_data(work, "prompt"), processing_class=tokenizer)
    return _finish(trainer, out, tokenizer)


def distil_row(work: Path, out: Path, overrides: list[str]) -> dict:
    from distil import pipeline
    from distil.config.loading import load_recipe

    recipe = load_recipe(work / "recipe.yaml", [f"out={out}", *overrides])
    summary = pipeline.train(recipe)["student"]
    (out / "model").unlink(missing_ok=True)
    (out / "model").symlink_to("student")
    return {"steps": summary["steps"], "loop_s": summary["seconds"]}


def run_row(name: str, work: Path, out: Path, extra: list[str] = ()) -> dict:
    """Train row `name` (a key of ROWS, or distil-* with extra recipe overrides) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if name in TRL_ROWS:
        return TRL_ROWS[name](work, out)
    base = next(b for b in sorted(DISTIL_ROWS, key=len, reverse=True) if name.startswith(b))
    return distil_row(work, out, DISTIL_ROWS[base] + list(extra))


TRL_ROWS = {
    "trl-sft": trl_sft,
    "trl-gkd-lambda0": lambda work, out: trl_gkd(work, out, 0.0),
    "trl-gkd-lambda0.5": lambda work, out: trl_gkd(work, out, 0.5),
    "trl-distillation": trl_distillation,
}
ROWS = list(TRL_ROWS) + list(DISTIL_ROWS)
