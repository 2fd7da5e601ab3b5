"""`distil adapt`: LoRA on labelled domain data, from a student folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distil.errors import DistilError
from distil.files import write_atomic
from distil.models.lora import inner, merge, save_adapter, wrap


def labelled_rows(examples, tokenizer, system_prompt: str | None = None, max_prompt_tokens: int = 256) -> list[dict]:
    """Labelled examples as training rows: the chat prompt's ids, then the reference answer's ids + end of turn.

    Shaped like teacher-cache rows whose only "top-k" token is the reference token, so the
    training loop's cross-entropy (alpha = 1) trains on the references.
    """
    from distil.data.examples import format_prompt

    rows = []
    for ex in examples:
        if not ex.reference:
            raise DistilError("a labelled example needs a reference answer", file=ex.source or None, field="reference")
        prompt_ids = tokenizer(format_prompt(tokenizer, ex.messages, system_prompt), add_special_tokens=False)["input_ids"]
        ids = tokenizer(ex.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"prompt_ids": prompt_ids[-max_prompt_tokens:], "token_ids": ids, "topk_ids": [[t] for t in ids],
                     "topk_logprobs": [[0.0]] * len(ids), "tail_logprob": [float("-inf")] * len(ids)})
    return rows


def adapt(model_dir: Path | str, data: Path | str, out: Path | str, *, r: int = 8, alpha: float = 16.0,
          target_modules: tuple[str, ...] = ("q_proj", "v_proj"), steps: int = 100, lr: float = 1e-3,
          batch_size: int = 8, merge_into_model: bool = False, seed: int = 0) -> dict:
    """Fine-tune a distilled student on labelled data (prompt + reference) with LoRA.

    Writes `out` as a peft adapter folder whose base is `model_dir`, or, with
    `merge_into_model`, as a plain Hugging Face model folder. Returns the training summary.

    Example:
        >>> adapt("runs/quickstart/student", "support.jsonl", "runs/support-lora", steps=200)
    """
    from transformers import AutoModelForCausalLM

    from distil.config.recipe import TrainConfig
    from distil.data.examples import load_examples
    from distil.models.sources import load_tokenizer
    from distil.training.loop import train_student

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").exists():
        raise DistilError("not a Hugging Face model folder (no config.json)", file=str(model_dir), field="model")
    tokenizer = load_tokenizer(model_dir)
    rows = labelled_rows(load_examples(data), tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = wrap(model, r, alpha, list(target_modules))
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=min(batch_size, len(rows)), warmup=min(10, steps // 10),
                      checkpoint_every=max(steps, 1), log_every=max(1, steps // 20), seed=seed)
    work = out.with_name(f".{out.name}.work")
    summary = train_student(inner(peft_model), rows, cfg, pad_id=tokenizer.pad_token_id, out_dir=work,
                            run_name="adapt", alpha=1.0, resume=False, fingerprint="adapt")

    def write(tmp: Path) -> None:
        if merge_into_model:
            merge(peft_model).save_pretrained(tmp)
        else:
            save_adapter(peft_model, tmp, str(model_dir.resolve()))
        tokenizer.save_pretrained(tmp)
        (tmp / "distil_adapt.json").write_text(json.dumps({
            "base": str(model_dir.resolve()), "data": str(data), "r": r, "alpha": alpha,
            "target_modules": list(target_modules), "merged": merge_into_model, "summary": summary}, indent=2))

    write_atomic(out, write)
    shutil.rmtree(work, ignore_errors=True)
    return summary


