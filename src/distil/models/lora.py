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
from pathlib import Path

import torch

from distil.errors import DistilError
from distil.files import write_atomic

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def wrap(model, r: int, alpha: float, target_modules: list[str], dropout: float = 0.0):
    """The peft wrapper around `model` (modified in place: LoRA layers in, other weights frozen)."""
    from distil.errors import require

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
    peft_model = wrap(student, spec.lora.r, spec.lora.lora_alpha, spec.lora.target_modules, spec.lora.dropout)
    peft_model._distil_base = base  # saved next to the adapters by save_and_merge
    return peft_model


def save_and_merge(peft_model, adapter_dir: Path):
    """Write the adapters (and, for a built student, their base) to `adapter_dir`; return the merged model."""
    base = getattr(peft_model, "_distil_base", None)
    if base is not None:
        base_path = str((adapter_dir / "base").resolve())
    else:
        base_path = peft_model.peft_config["default"].base_model_name_or_path  # the ready student's folder

    def write(tmp: Path) -> None:
        if base is not None:
            base.save_pretrained(tmp / "base")
        save_adapter(peft_model, tmp, base_path)

    write_atomic(adapter_dir, write)
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




