"""LoRA with peft: distil into adapters (`student.lora` in the recipe), and adapt a distilled
student to labelled domain data (`distil adapt`).

`get_peft_model` puts LoRA layers into the model in place and freezes everything else, so the
training loop receives the plain transformers model inside the peft wrapper (its
`base_model` still gives hidden states) and trains only the adapters. At the end the adapters
are saved in peft's format (adapter_config.json + adapter_model.safetensors) and/or merged
into a plain model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from distil.errors import DistilError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def wrap(model, r: int, alpha: float, target_modules: list[str], dropout: float = 0.0):
    """The peft wrapper around `model` (modified in place: LoRA layers in, other weights frozen)."""
    from distil.export import require

    require("peft", "lora")
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise DistilError(f"no Linear layer named {missing} in the model (it has {', '.join(sorted(names))})",
                          field="lora.target_modules")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def inner(peft_model):
    """The transformers model inside the peft wrapper, LoRA layers included (what the training loop takes)."""
    return peft_model.base_model.model


def save_adapter(peft_model, folder: Path, base: str) -> None:
    """Save the adapters in peft's format, pointing at `base` (a folder or hub id the adapters apply to)."""
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(folder)


def merge(peft_model):
    """A plain transformers model with the adapters folded into its weights."""
    return peft_model.merge_and_unload().eval()


def wrap_student(student, spec, adapter_dir: Path):
    """`wrap` for the recipe's student. A student built here (from the teacher or a config) has no
    folder of its own, so its untrained weights are kept for the adapters' base (`adapter_dir/base`)."""
    base = None
    if spec.model is None:
        import copy

        base = copy.deepcopy(student)
    peft_model = wrap(student, spec.lora.r, spec.lora.alpha, spec.lora.target_modules, spec.lora.dropout)
    peft_model._distil_base = base  # saved next to the adapters by save_and_merge
    return peft_model


def save_and_merge(peft_model, adapter_dir: Path):
    """Write the adapters (and, for a built student, their base) to `adapter_dir`; return the merged model."""
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base = getattr(peft_model, "_distil_base", None)
    if base is not None:
        base.save_pretrained(tmp / "base")
        base_path = str((adapter_dir / "base").resolve())
    else:
        base_path = peft_model.peft_config["default"].base_model_name_or_path  # the ready student's folder
    save_adapter(peft_model, tmp, base_path)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(tmp, adapter_dir)
    return merge(peft_model)


def load_merged(adapter_dir: Path | str):
    """Load a peft adapter folder onto its base model and merge (float32, eval mode)."""
    return load_with_adapters(adapter_dir).merge_and_unload().eval()


def load_with_adapters(adapter_dir: Path | str):
    """A peft adapter folder on its base model, adapters kept separate (float32, eval mode)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").exists():
        raise DistilError(f"the adapters' base model '{base}' is not a model folder here", file=str(adapter_dir / "adapter_config.json"),
                          field="base_model_name_or_path")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def labelled_rows(examples, tokenizer, system_prompt: str | None = None, max_prompt_tokens: int = 256) -> list[dict]:
    """Labelled examples as training rows: the chat prompt's ids, then the reference answer's ids + end of turn.

    Shaped like teacher-cache rows whose only "top-k" token is the reference token, so the
    training loop's cross-entropy (alpha = 1) trains on the references.
    """
    from distil.data import format_prompt

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

    from distil.data import load_examples
    from distil.models import load_tokenizer
    from distil.recipe import TrainConfig
    from distil.training import train_student

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
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge_into_model:
        merge(peft_model).save_pretrained(tmp)
    else:
        save_adapter(peft_model, tmp, str(model_dir.resolve()))
    tokenizer.save_pretrained(tmp)
    (tmp / "distil_adapt.json").write_text(json.dumps({"base": str(model_dir.resolve()), "data": str(data), "r": r,
                                                      "alpha": alpha, "target_modules": list(target_modules),
                                                      "merged": merge_into_model, "summary": summary}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    return summary
